// On-device mode: the exported model runs in this page with onnxruntime-web (WebAssembly); the X-ray never leaves.
// Every step repeats pneumoscan's Python path (pneumoscan.inputs.preprocessing, inference.Predictor) with the card's numbers:
// grayscale as Pillow's "L", Pillow's bilinear resize, ImageOps.equalize, ImageNet normalisation, the population
// classifier, each population's temperature, threshold and out-of-distribution gate.
import * as ort from "/static/vendor/onnxruntime-web/ort.wasm.min.mjs";

ort.env.wasm.wasmPaths = "/static/vendor/onnxruntime-web/";
ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;

const loaded = {};  // by precision: {settings, session, gates}

async function fetchBytes(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url} could not be loaded (${response.status})`);
  return new Uint8Array(await response.arrayBuffer());
}

async function sha256Hex(bytes) {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

export async function load(precision = "int8") {
  if (loaded[precision]) return loaded[precision];
  const response = await fetch("/model/device.json");
  if (!response.ok) throw new Error("the model's settings could not be loaded");
  const settings = await response.json();
  const file = settings.files[precision];
  if (!file) throw new Error(`this model has no ${precision} version`);
  const bytes = await fetchBytes(file.url);
  const actual = await sha256Hex(bytes);
  if (actual !== file.sha256) {  // a damaged or swapped file must not answer
    throw new Error(`the model file does not match its card (sha256 ${actual.slice(0, 12)}…, the card says ${file.sha256.slice(0, 12)}…)`);
  }
  const session = await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"], graphOptimizationLevel: "all" });
  const gates = {};
  for (const [name, population] of Object.entries(settings.populations)) {
    if (population.gate) gates[name] = new Float32Array((await fetchBytes(population.gate.url)).buffer);
  }
  loaded[precision] = { settings, session, gates, precision, sha256: actual };
  return loaded[precision];
}

// --- decoding and preprocessing (pneumoscan.inputs.imaging / pneumoscan.inputs.preprocessing) ---------------------------------

export async function decodeGray(blob) {
  const bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none", imageOrientation: "from-image" });
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.fillStyle = "#000";  // transparent pixels over black, as the loader composites them
  context.fillRect(0, 0, bitmap.width, bitmap.height);
  context.drawImage(bitmap, 0, 0);
  const rgba = context.getImageData(0, 0, bitmap.width, bitmap.height).data;
  const gray = new Uint8Array(bitmap.width * bitmap.height);
  for (let i = 0; i < gray.length; i++) {  // Pillow's "L": L = R·299/1000 + G·587/1000 + B·114/1000, in fixed point
    gray[i] = (rgba[4 * i] * 19595 + rgba[4 * i + 1] * 38470 + rgba[4 * i + 2] * 7471 + 0x8000) >> 16;
  }
  return { gray, width: bitmap.width, height: bitmap.height, bitmap };
}

const PRECISION_BITS = 32 - 8 - 2;

function resampleCoefficients(inSize, outSize) {  // Pillow's precompute_coeffs, bilinear filter (support 1)
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1);
  const support = filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = [], weights = [];
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const ss = 1 / filterscale;
    let xmin = Math.trunc(center - support + 0.5); if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5); if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    const k = new Float64Array(ksize);
    let total = 0;
    for (let x = 0; x < xmax; x++) {
      const t = Math.abs((x + xmin - center + 0.5) * ss);
      const w = t < 1 ? 1 - t : 0;
      k[x] = w; total += w;
    }
    const fixed = new Int32Array(ksize);
    for (let x = 0; x < xmax; x++) {
      const v = total !== 0 ? k[x] / total : 0;
      fixed[x] = v < 0 ? Math.trunc(-0.5 + v * (1 << PRECISION_BITS)) : Math.trunc(0.5 + v * (1 << PRECISION_BITS));
    }
    bounds.push([xmin, xmax]); weights.push(fixed);
  }
  return { bounds, weights };
}

function clip8(value) {
  const v = Math.floor(value / 2 ** PRECISION_BITS);  // an arithmetic shift by PRECISION_BITS, without 32-bit overflow
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

export function resizeBilinear(gray, width, height, size) {  // Pillow's Image.resize(BILINEAR): horizontal, then vertical
  if (width === size && height === size) return gray;
  const h = resampleCoefficients(width, size);
  const across = new Uint8Array(size * height);
  for (let y = 0; y < height; y++) {
    for (let xx = 0; xx < size; xx++) {
      const [xmin, n] = h.bounds[xx], k = h.weights[xx];
      let ss = 1 << (PRECISION_BITS - 1);
      for (let x = 0; x < n; x++) ss += gray[y * width + x + xmin] * k[x];
      across[y * size + xx] = clip8(ss);
    }
  }
  const v = resampleCoefficients(height, size);
  const out = new Uint8Array(size * size);
  for (let yy = 0; yy < size; yy++) {
    const [ymin, n] = v.bounds[yy], k = v.weights[yy];
    for (let x = 0; x < size; x++) {
      let ss = 1 << (PRECISION_BITS - 1);
      for (let y = 0; y < n; y++) ss += across[(y + ymin) * size + x] * k[y];
      out[yy * size + x] = clip8(ss);
    }
  }
  return out;
}

export function equalize(gray) {  // Pillow's ImageOps.equalize
  const histogram = new Array(256).fill(0);
  for (const v of gray) histogram[v]++;
  const used = histogram.filter((n) => n > 0);
  const lut = new Uint8Array(256);
  let step = used.length <= 1 ? 0 : Math.floor((used.reduce((a, b) => a + b, 0) - used[used.length - 1]) / 255);
  if (!step) { for (let i = 0; i < 256; i++) lut[i] = i; } else {
    let n = Math.floor(step / 2);
    for (let i = 0; i < 256; i++) { lut[i] = Math.min(255, Math.floor(n / step)); n += histogram[i]; }
  }
  return gray.map((v) => lut[v]);
}

export function toTensor(gray, size, mean, std) {
  const data = new Float32Array(3 * size * size);
  for (let c = 0; c < 3; c++) {
    for (let i = 0; i < size * size; i++) data[c * size * size + i] = (Math.fround(gray[i] / 255) - mean[c]) / std[c];
  }
  return data;
}

// --- what Predictor does after the graph ---------------------------------------------------------------------------

function sigmoid(x) { return 0.5 * (1 + Math.tanh(0.5 * x)); }

function population(settings, embedding) {
  const names = Object.keys(settings.populations);
  const classifier = settings.population_classifier;
  if (names.length === 1 || !classifier) return { name: settings.default_population, source: names.length === 1 ? "the model's only population" : "default (nothing told the population)" };
  let z = classifier.intercept;
  for (let i = 0; i < embedding.length; i++) z += ((embedding[i] - classifier.mean[i]) / classifier.scale[i]) * classifier.coef[i];
  return { name: sigmoid(z) >= 0.5 ? "adult" : "child", source: "the image" };
}

function mahalanobis(x, stats, offset, dim) {
  // (x − mean)ᵀ · precision · (x − mean) from the mean and the precision's upper triangle (row by row), as float32
  const c = new Float64Array(dim);
  for (let i = 0; i < dim; i++) c[i] = Math.fround(x[i] - stats[offset + i]);
  let total = 0;
  let k = offset + dim;
  for (let i = 0; i < dim; i++) {
    let row = stats[k++] * c[i];  // the diagonal once, each pair above it twice
    for (let j = i + 1; j < dim; j++) row += 2 * stats[k++] * c[j];
    total += row * c[i];
  }
  return total;
}

function gateScore(gate, stats, embedding) {
  const dim = gate.dim;
  const raw = mahalanobis(embedding, stats, 0, dim);
  if (!gate.two_stage) return raw;
  let norm = 0;
  for (const v of embedding) norm += v * v;
  norm = Math.max(Math.sqrt(norm), 1e-12);
  const unit = Float32Array.from(embedding, (v) => v / norm);
  const direction = mahalanobis(unit, stats, dim + (dim * (dim + 1)) / 2, dim);
  return Math.max(raw / gate.threshold, direction / gate.l2_threshold);
}

export async function predict(model, blob) {
  const { settings, session, gates } = model;
  const size = settings.input.size;
  const image = await decodeGray(blob);
  let gray = resizeBilinear(image.gray, image.width, image.height, size);
  if (settings.input.intensity === "equalize") gray = equalize(gray);
  else if (settings.input.intensity !== "none") throw new Error(`intensity mode ${settings.input.intensity} is not available on the device`);
  const started = performance.now();
  const feeds = { image: new ort.Tensor("float32", toTensor(gray, size, settings.input.mean, settings.input.std), [1, 3, size, size]) };
  const out = await session.run(feeds);
  const logit = out.logit.data[0];
  const embedding = out.embedding.data;
  const who = population(settings, embedding);
  const point = settings.populations[who.name];
  const probability = sigmoid(logit / point.temperature);
  const score = point.gate ? gateScore(point.gate, gates[who.name], embedding) : null;
  const heatmap = Float32Array.from(out.heatmap.data);
  const inDistribution = score === null ? null : score <= point.gate.cutoff;
  const flagged = probability >= point.threshold && inDistribution !== false;  // regions only for a validated pneumonia
  const regions = flagged && point.regions ? findRegions(heatmap, size, probability, point.regions, image.width, image.height) : [];
  const regionsNote = !flagged || regions.length ? null
    : !point.regions ? `no regions: where the pneumonia lies was not measured for the ${who.name} population (no radiologists' boxes in its validation part); the heat map is shown for reference`
      : "no region marked: no part of the heat map is both hot and large enough under the rule fitted on validation";
  return {
    local: true, probability, logit, label: probability >= point.threshold ? "PNEUMONIA" : "NORMAL",
    threshold: point.threshold, operating_point: point.operating_point, operating_point_source: point.operating_point_source,
    population: who.name, population_source: who.source, population_note: null,
    in_distribution: inDistribution, ood_score: score,
    heatmap, size, image, regions, regions_note: regionsNote, seconds: (performance.now() - started) / 1000,
  };
}

// --- regions (pneumoscan.running.regions: the same steps, the same numbers) ------------------------------------------

function roundTo(value, digits) { const f = 10 ** digits; return Math.round(value * f) / f; }

export function findRegions(heatmap, size, probability, rule, width, height) {
  const grid = rule.grid;
  const cells = new Float32Array(grid * grid);
  for (let r = 0; r < grid; r++) {
    for (let c = 0; c < grid; c++) cells[r * grid + c] = heatmap[Math.floor(((r + 0.5) * size) / grid) * size + Math.floor(((c + 0.5) * size) / grid)];
  }
  let top = 0;
  for (const v of cells) top = Math.max(top, v);
  if (top <= 0) return [];
  const cut = Math.fround(Math.fround(rule.level) * top);
  const seen = new Uint8Array(grid * grid);
  const groups = [];
  for (let start = 0; start < cells.length; start++) {  // reading order, as np.nonzero
    if (seen[start] || !(cells[start] >= cut)) continue;
    seen[start] = 1;
    const stack = [start];
    let n = 0, peak = 0, rowMin = grid, rowMax = -1, colMin = grid, colMax = -1;
    while (stack.length) {
      const k = stack.pop(), r = Math.floor(k / grid), c = k % grid;
      n++; peak = Math.max(peak, cells[k]);
      rowMin = Math.min(rowMin, r); rowMax = Math.max(rowMax, r); colMin = Math.min(colMin, c); colMax = Math.max(colMax, c);
      for (const [nr, nc] of [[r - 1, c], [r + 1, c], [r, c - 1], [r, c + 1]]) {
        const j = nr * grid + nc;
        if (nr >= 0 && nr < grid && nc >= 0 && nc < grid && !seen[j] && cells[j] >= cut) { seen[j] = 1; stack.push(j); }
      }
    }
    groups.push({ score: roundTo(probability * (peak / top), 4), order: groups.length, n, rowMin, rowMax, colMin, colMax });
  }
  groups.sort((a, b) => b.score - a.score || a.order - b.order);
  const cellWidth = width / grid, cellHeight = height / grid;
  return groups.filter((g) => g.n >= rule.min_area * grid * grid).slice(0, rule.max_regions).map((g) => ({
    x: roundTo(g.colMin * cellWidth, 1), y: roundTo(g.rowMin * cellHeight, 1),
    width: roundTo((g.colMax + 1 - g.colMin) * cellWidth, 1), height: roundTo((g.rowMax + 1 - g.rowMin) * cellHeight, 1), score: g.score,
  }));
}

// --- pictures (pneumoscan.running.explanation.overlay) ----------------------------------------------------------------------

const JET = [[0.0, 0.0, 0.0, 0.5], [0.11, 0.0, 0.0, 1.0], [0.34, 0.0, 1.0, 1.0], [0.5, 0.5, 1.0, 0.5], [0.65, 1.0, 1.0, 0.0], [0.89, 1.0, 0.0, 0.0], [1.0, 0.5, 0.0, 0.0]];

function jet(value) {
  const v = Math.min(1, Math.max(0, value));
  let i = 1;
  while (i < JET.length - 1 && JET[i][0] < v) i++;
  const [x0, ...a] = JET[i - 1], [x1, ...b] = JET[i];
  const t = x1 === x0 ? 0 : (v - x0) / (x1 - x0);
  return a.map((c, k) => Math.round(255 * (c + t * (b[k] - c))));
}

const JET_LUT = Array.from({ length: 256 }, (_, i) => jet(i / 255));  // the overlay reads 8-bit map values

// blend[c][value << 8 | heat]: a channel's value under a heat level, as the loop over pixels once computed it (the server's
// explanation.blend_table, per channel since a photo's channels differ): three lookups a pixel instead of float arithmetic.
let BLEND = null;
function blendTables() {
  if (BLEND) return BLEND;
  BLEND = [0, 1, 2].map(() => new Uint8ClampedArray(256 * 256));
  for (let heat = 0; heat < 256; heat++) {
    const weight = 0.45 * (0.3 + 0.7 * (heat / 255)), colour = JET_LUT[heat];
    for (let value = 0; value < 256; value++) {
      for (let c = 0; c < 3; c++) BLEND[c][(value << 8) | heat] = Math.round(value * (1 - weight) + colour[c] * weight);
    }
  }
  return BLEND;
}

export async function pictures(result) {
  const { bitmap, width, height } = result.image;
  const xray = new OffscreenCanvas(width, height);
  xray.getContext("2d").drawImage(bitmap, 0, 0);
  const small = new OffscreenCanvas(result.size, result.size);  // the map, then scaled to the X-ray like the overlay
  const cells = small.getContext("2d").createImageData(result.size, result.size);
  for (let i = 0; i < result.heatmap.length; i++) {  // written in place: no array allocated per pixel
    cells.data[4 * i] = result.heatmap[i] * 255;
    cells.data[4 * i + 3] = 255;
  }
  small.getContext("2d").putImageData(cells, 0, 0);
  const big = new OffscreenCanvas(width, height);
  const bigContext = big.getContext("2d", { willReadFrequently: true });
  bigContext.drawImage(small, 0, 0, width, height);
  const heat = bigContext.getImageData(0, 0, width, height).data;
  const base = xray.getContext("2d", { willReadFrequently: true }).getImageData(0, 0, width, height);
  const [red, green, blue] = blendTables(), pixels = base.data;
  for (let i = 0, j = 0; i < width * height; i++, j += 4) {
    const h = heat[j];
    pixels[j] = red[(pixels[j] << 8) | h];
    pixels[j + 1] = green[(pixels[j + 1] << 8) | h];
    pixels[j + 2] = blue[(pixels[j + 2] << 8) | h];
  }
  const overlay = new OffscreenCanvas(width, height);
  overlay.getContext("2d").putImageData(base, 0, 0);
  const url = async (canvas) => URL.createObjectURL(await canvas.convertToBlob({ type: "image/png" }));
  return { image_url: await url(xray), heatmap_url: await url(overlay) };
}
