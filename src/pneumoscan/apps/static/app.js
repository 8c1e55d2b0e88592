"use strict";
// The pneumoscan page: upload, show the answer in words, the probability bar and the heat map.
const $ = (id) => document.getElementById(id);
const api = "/api/v1/predictions";

function show(el, on) { el.hidden = !on; }

function setError(message) {
  $("error").textContent = message || "";
  show($("error"), Boolean(message));
}

// The API key, when the service needs one: asked for on the first 401, kept for this tab only (sessionStorage).
const KEY = "pneumoscan-api-key";
let retryAfterKey = null;

function askForKey(message, retry) {
  retryAfterKey = retry;
  $("key-message").textContent = message;
  show($("key-form"), true);
  $("key").focus();
}

function saveKey(event) {
  event.preventDefault();
  const key = $("key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY, key);
  $("key").value = "";
  show($("key-form"), false);
  const retry = retryAfterKey;
  retryAfterKey = null;
  refreshRecent();
  showOperatingPoints();
  refreshDrift();
  if (retry) retry();
}

// On-device mode: the model runs here (device.js, onnxruntime-web); no request carries the image, nothing is recorded.
let device = null;

function mode() { return document.querySelector('input[name="mode"]:checked').value; }

async function deviceModel() {
  device = device || await import("/static/device.js");
  return device.load($("precision").value);
}

async function prepareDevice() {
  const on = mode() === "device";
  show($("device-note"), on);
  if (!on) return;
  $("status").textContent = "Loading the model onto this device …";
  try {
    const model = await deviceModel();
    $("status").textContent = `The model (${model.settings.name}, ${model.precision}, checked against its card) runs on this device.`;
    describeOperatingPoints(model.settings.name, Object.entries(model.settings.populations).map(([population, p]) => (
      { population, name: p.operating_point, threshold: p.threshold, in_force: p.operating_point_source })));
  } catch (e) {
    $("status").textContent = "";
    setError(`The model cannot run on this device: ${e.message}. Use the server mode.`);
  }
}

async function scoreHere(file) {
  setError("");
  if (/\.(dcm|dicom)$/i.test(file.name) || file.type === "application/dicom") {
    setError("DICOM files are read in the server mode only; on this device: JPEG or PNG.");
    return;
  }
  $("status").textContent = `Scoring ${file.name} on this device …`;
  const started = performance.now();
  try {
    const model = await deviceModel();
    const result = await device.predict(model, file);
    Object.assign(result, await device.pictures(result));
    window.pneumoscanLast = { probability: result.probability, label: result.label, population: result.population,
                              in_distribution: result.in_distribution, heatmap: Array.from(result.heatmap), regions: result.regions, regions_note: result.regions_note,
                              precision: model.precision, seconds: result.seconds, name: file.name,
                              total_seconds: (performance.now() - started) / 1000 };  // file to heat map
    $("status").textContent = "";
    render(result, file);
  } catch (e) {
    $("status").textContent = "";
    show($("result"), false);
    setError(`This file could not be analysed on this device: ${e.message || e}`);
  }
}

async function upload(file) {
  if (mode() === "device") return scoreHere(file);
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
  if (response.status === 401) {
    sessionStorage.removeItem(KEY);
    askForKey("This service needs its API key: ask its administrator. The key is kept for this tab only.", () => upload(file));
    return;
  }
  if (!response.ok) {
    show($("result"), false);
    setError(`This file could not be analysed: ${body.detail || response.statusText}`);
    return;
  }
  render(body, file);
  refreshRecent();
  refreshDrift();
}

// Which operating point answers, per population: the one fitted on validation or a site calibration (with its date).
async function showOperatingPoints() {
  const response = await fetch("/api/v1/model", { headers: apiHeaders() }).catch(() => null);
  if (!response || !response.ok) return;
  const model = await response.json();
  describeOperatingPoints(model.name, model.operating_points);
}

function describeOperatingPoints(name, points) {  // from the API, or on the device from the model's own settings
  const words = { child: "children", adult: "adults" };
  $("operating-points").textContent = `Model ${name}. Operating point in force: ` + points.map(
    (p) => `${words[p.population] || p.population}: ${p.name} (threshold ${(100 * p.threshold).toFixed(1)} %; ${p.in_force})`).join("; ") + ".";
}

// A plain-words warning when recent studies no longer look like those the operating point was set on.
async function refreshDrift() {
  const response = await fetch("/api/v1/drift", { headers: apiHeaders() }).catch(() => null);
  if (!response || !response.ok) return;
  const drift = await response.json();
  $("drift").textContent = drift.warning ? drift.message : "";
  show($("drift"), Boolean(drift.warning));
}

// Sensitivity and specificity of the operating points in force, from the readings recorded so far.
async function refreshPerformance() {
  const response = await fetch("/api/v1/performance", { headers: apiHeaders() }).catch(() => null);
  if (!response || !response.ok) return;
  const figures = await response.json();
  const groups = figures.groups.filter((g) => g.in_force);
  const share = (p) => p.value === null ? "–" : `${(100 * p.value).toFixed(1)} % (${(100 * p.low).toFixed(1)}–${(100 * p.high).toFixed(1)}; ${p.k}/${p.n})`;
  $("performance").replaceChildren(...groups.map((g) => {
    const tr = document.createElement("tr");
    const missed = `${g.counts.false_negative}` + (g.allowed_misses === null ? "" : ` (${g.allowed_misses})`);
    for (const text of [g.population || "–", `${g.operating_point} [${g.operating_point_source}]`, `${g.n}`,
                        share(g.sensitivity), share(g.specificity), share(g.ppv), share(g.npv), missed]) {
      const td = document.createElement("td"); td.textContent = text; tr.append(td);
    }
    return tr;
  }));
  show($("performance-table"), groups.length > 0);
  show($("performance-empty"), groups.length === 0);
  $("performance-warning").textContent = figures.warning ? `Below its promise: ${figures.message}.` : "";
  show($("performance-warning"), Boolean(figures.warning));
}

function apiHeaders() {
  const key = sessionStorage.getItem(KEY);
  return key ? { "X-API-Key": key } : {};
}

// Pictures come through fetch, with the key, and are shown from blob: URLs (an <img src> cannot send a header).
const pictureUrls = {};

async function showPicture(id, url) {
  const response = await fetch(url, { headers: apiHeaders(), cache: "no-store" }).catch(() => null);
  if (!response || !response.ok) { $(id).removeAttribute("src"); return; }
  if (pictureUrls[id]) URL.revokeObjectURL(pictureUrls[id]);
  pictureUrls[id] = URL.createObjectURL(await response.blob());
  $(id).src = pictureUrls[id];
}

function render(result, file) {
  const pneumonia = result.label === "PNEUMONIA";
  const validated = result.in_distribution !== false;
  const decision = $("decision");
  const pct = (x) => `${(100 * x).toFixed(1)} %`;
  const who = result.population ? ` (${result.population}; ${result.population_source})` : "";
  if (validated) {
    const source = result.operating_point_source ? ` [${result.operating_point_source}]` : "";
    decision.textContent = (pneumonia ? "Pneumonia suspected" : "No pneumonia found") + ` — operating point: ${result.operating_point}${source}${who}`;
    decision.className = "decision " + (pneumonia ? "pneumonia" : "normal");
    $("probability-text").textContent = `Calibrated probability of pneumonia: ${pct(result.probability)} (threshold ${pct(result.threshold)}).`;
    $("probability-text").className = "";
  } else {
    // No red or green verdict for an image unlike those validated: the reason first, the probability muted beneath.
    decision.textContent = "Not validated for this image";
    decision.className = "decision unvalidated";
    $("probability-text").textContent = `For reference only: the model's probability would be ${pct(result.probability)}; it was not validated on images like this one.`;
    $("probability-text").className = "muted";
  }
  $("bar-fill").style.width = pct(result.probability).replace(" ", "");
  $("bar-fill").className = validated ? "" : "muted-fill";
  $("bar-threshold").style.left = pct(result.threshold).replace(" ", "");
  const ood = $("ood");
  ood.textContent = "It does not look like the frontal chest X-rays of children and adults this model was validated on.";
  show(ood, !validated);
  const note = $("population-note");
  note.textContent = result.population_note || "";
  show(note, Boolean(result.population_note));
  // the previous study's pictures must not stay beside this result while the new ones load
  for (const id of ["xray", "heatmap"]) $(id).removeAttribute("src");
  showRegions(result.regions || [], result.regions_note);
  if (result.local) {  // drawn on this device: blob: URLs, nothing fetched
    $("xray").src = result.image_url;
    $("heatmap").src = result.heatmap_url;
  } else {
    showPicture("xray", result.image_url);
    showPicture("heatmap", result.heatmap_url);
  }
  $("where").textContent = result.local ? "Scored on this device: the X-ray did not leave it, and this result is not recorded." : "";
  prepareReading(result.local ? null : result.id);
  show($("result"), true);
}

// A radiologist's reading, recorded against the prediction shown (server mode only: a device result has no record).
let readingFor = null;
const READER = "pneumoscan-reader";
const FINDING_WORDS = { pneumonia: "pneumonia", no_pneumonia: "no pneumonia", cannot_tell: "cannot tell" };

function describeReading(r, superseded) {
  const when = r.read_at.replace("T", " ").slice(0, 16);
  return `Reading in force: ${FINDING_WORDS[r.finding]}, by ${r.reader}, read ${when} UTC` + (superseded ? ` (supersedes ${superseded} earlier)` : "") + ".";
}

async function prepareReading(id) {
  readingFor = id;
  const form = $("reading-form");
  form.reset();
  $("reader").value = sessionStorage.getItem(READER) || "";
  $("reading-status").textContent = "";
  show(form, Boolean(id));
  if (id) showReadings(id, "");
}

// The reading in force (the latest), unless the page has moved on to another study meanwhile.
async function showReadings(id, prefix) {
  const response = await fetch(`${api}/${id}/readings`, { headers: apiHeaders() }).catch(() => null);
  if (!response || !response.ok || readingFor !== id) return;
  const readings = await response.json();
  if (readings.length) $("reading-status").textContent = prefix + describeReading(readings[readings.length - 1], readings.length - 1);
}

async function recordReading(event) {
  event.preventDefault();
  const form = $("reading-form"), id = readingFor;
  if (!id || !form.reportValidity()) return;
  const finding = form.querySelector('input[name="finding"]:checked').value;
  const reading = { finding, reader: $("reader").value.trim(), source: "page" };
  if ($("reading-comment").value.trim()) reading.comment = $("reading-comment").value.trim();
  $("reading-status").textContent = "Recording …";
  const response = await fetch(`${api}/${id}/readings`, {
    method: "POST", body: JSON.stringify(reading), headers: { ...apiHeaders(), "Content-Type": "application/json" },
  }).catch(() => null);
  if (!response) { $("reading-status").textContent = "The service cannot be reached: the reading was not recorded. Try again."; return; }
  if (response.status === 401) {
    sessionStorage.removeItem(KEY);
    askForKey("This service needs its API key: ask its administrator. The key is kept for this tab only.", () => recordReading(event));
    return;
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) { $("reading-status").textContent = `The reading was not recorded: ${body.detail || response.statusText}`; return; }
  sessionStorage.setItem(READER, reading.reader);
  $("reading-comment").value = "";
  showReadings(id, "Recorded. ");
  refreshPerformance();
}

// Regions come in pixels of the X-ray; they are placed as shares of it once it has loaded (its natural size known).
let pendingRegions = [];

function showRegions(regions, note) {
  pendingRegions = regions;
  $("regions").replaceChildren();
  const text = regions.length
    ? `${regions.length} region${regions.length > 1 ? "s" : ""} where the model sees the pneumonia (green, with its score). Measured against radiologists' boxes they are weak (see the model card): read them as where the model looked.`
    : (note || "");
  $("regions-text").textContent = text;
}

function drawRegions() {
  const image = $("xray");
  if (!image.naturalWidth) return;
  const w = image.naturalWidth, h = image.naturalHeight, pct = (v, of) => `${(100 * v) / of}%`;
  $("regions").replaceChildren(...pendingRegions.map((r) => {
    const box = document.createElement("div");
    box.className = "region";
    Object.assign(box.style, { left: pct(r.x, w), top: pct(r.y, h), width: pct(r.width, w), height: pct(r.height, h) });
    const tag = document.createElement("span");
    tag.textContent = r.score.toFixed(2);
    box.append(tag);
    return box;
  }));
}

async function refreshRecent() {
  const response = await fetch(`${api}?limit=10`, { headers: apiHeaders() }).catch(() => null);
  if (response && response.status === 401) {
    askForKey("This service needs its API key: ask its administrator. The key is kept for this tab only.", null);
    return;
  }
  if (!response || !response.ok) return;
  const rows = await response.json();
  const body = $("recent");
  body.replaceChildren(...rows.map((r) => {
    const tr = document.createElement("tr");
    const flagged = r.in_distribution === false;
    const cells = [r.created_at.replace("T", " ").slice(0, 19),
                   flagged ? "Not validated for this image" : (r.label === "PNEUMONIA" ? "Pneumonia suspected" : "No pneumonia found"),
                   flagged ? `(${(100 * r.probability).toFixed(1)} %)` : `${(100 * r.probability).toFixed(1)} %`,
                   r.population || "–", flagged ? "No" : "Yes"];
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
  $("show-regions").addEventListener("change", (e) => { $("regions").style.visibility = e.target.checked ? "visible" : "hidden"; });
  $("xray").addEventListener("load", drawRegions);
  $("opacity").addEventListener("input", (e) => { $("heatmap").style.opacity = e.target.value / 100; });
  $("key-form").addEventListener("submit", saveKey);
  $("reading-form").addEventListener("submit", recordReading);
  for (const radio of document.querySelectorAll('input[name="mode"]')) radio.addEventListener("change", prepareDevice);
  $("precision").addEventListener("change", prepareDevice);
  refreshRecent();
  showOperatingPoints();
  refreshDrift();
  refreshPerformance();
  if ("serviceWorker" in navigator) navigator.serviceWorker.register("/sw.js").catch(() => {});  // offline after one visit
}
document.addEventListener("DOMContentLoaded", init);
