"use strict";
// The pneumoscan page: upload, show the answer in words, the probability bar and the heat map.
const $ = (id) => document.getElementById(id);
const api = "/api/v1/predictions";

function show(el, on) { el.hidden = !on; }

function setError(message) {
  $("error").textContent = message || "";
  show($("error"), Boolean(message));
}

async function upload(file) {
  setError("");
  $("status").textContent = `Reading ${file.name} …`;
  const form = new FormData();
  form.append("file", file, file.name);
  let response;
  try {
    response = await fetch(api, { method: "POST", body: form, headers: apiHeaders() });
  } catch (e) {
    $("status").textContent = "";
    setError("The service cannot be reached. Check the connection and try again.");
    return;
  }
  const body = await response.json().catch(() => ({}));
  $("status").textContent = "";
  if (!response.ok) {
    show($("result"), false);
    setError(`This file could not be analysed: ${body.detail || response.statusText}`);
    return;
  }
  render(body, file);
  refreshRecent();
}

function apiHeaders() {
  const key = sessionStorage.getItem("pneumoscan-api-key");
  return key ? { "X-API-Key": key } : {};
}

function render(result, file) {
  const pneumonia = result.label === "PNEUMONIA";
  const decision = $("decision");
  decision.textContent = (pneumonia ? "Pneumonia suspected" : "No pneumonia found") + ` — operating point: ${result.operating_point}`;
  decision.className = "decision " + (pneumonia ? "pneumonia" : "normal");
  const pct = (x) => `${(100 * x).toFixed(1)} %`;
  $("probability-text").textContent = `Calibrated probability of pneumonia: ${pct(result.probability)} (threshold ${pct(result.threshold)}).`;
  $("bar-fill").style.width = pct(result.probability).replace(" ", "");
  $("bar-threshold").style.left = pct(result.threshold).replace(" ", "");
  const ood = $("ood");
  ood.textContent = "This does not look like a frontal chest X-ray of a child; the result is not reliable.";
  show(ood, result.in_distribution === false);
  $("xray").src = result.image_url;
  $("heatmap").src = result.heatmap_url;
  show($("result"), true);
}

async function refreshRecent() {
  const response = await fetch(`${api}?limit=10`, { headers: apiHeaders() }).catch(() => null);
  if (!response || !response.ok) return;
  const rows = await response.json();
  const body = $("recent");
  body.replaceChildren(...rows.map((r) => {
    const tr = document.createElement("tr");
    const cells = [r.created_at.replace("T", " ").slice(0, 19), r.label === "PNEUMONIA" ? "Pneumonia suspected" : "No pneumonia found",
                   `${(100 * r.probability).toFixed(1)} %`, r.in_distribution === false ? "No — result not reliable" : "Yes"];
    for (const text of cells) { const td = document.createElement("td"); td.textContent = text; tr.append(td); }
    return tr;
  }));
}

function init() {
  const input = $("file"), drop = $("drop");
  input.addEventListener("change", () => input.files[0] && upload(input.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); if (e.dataTransfer.files[0]) upload(e.dataTransfer.files[0]); });
  $("show-heatmap").addEventListener("change", (e) => { $("heatmap").style.visibility = e.target.checked ? "visible" : "hidden"; });
  $("opacity").addEventListener("input", (e) => { $("heatmap").style.opacity = e.target.value / 100; });
  refreshRecent();
}
document.addEventListener("DOMContentLoaded", init);
