"""The page `meddiff serve` sends: HTML, its script (form → JSON job → polled previews, the Markdown model card
built as DOM nodes, never as HTML) and the Content-Security-Policy that allows nothing else."""

CSP = ("default-src 'none'; script-src 'self'; connect-src 'self'; img-src 'self'; style-src 'unsafe-inline'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>meddiff</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
[hidden] { display: none !important; }
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 60rem; padding: 0 1rem; color: #222; }
form { display: flex; flex-wrap: wrap; gap: .8rem 1.2rem; align-items: end; }
label { display: flex; flex-direction: column; font-size: .9rem; gap: .2rem; }
input, select { font-size: 1rem; width: 9rem; }
button { font-size: 1rem; padding: .35rem 1.2rem; }
#message { color: #a00; background: #fee; border: 1px solid #d99; padding: .5rem; }
#images { display: flex; flex-wrap: wrap; gap: .5rem; margin: 1rem 0; }
#images img { width: 128px; height: 128px; image-rendering: pixelated; background: #000; }
#card { background: #f6f6f6; padding: .2rem 1rem; font-size: .9rem; }
#card table { border-collapse: collapse; margin: .5rem 0; }
#card td, #card th { border: 1px solid #ccc; padding: .15rem .5rem; text-align: left; }
#card pre { background: #eee; padding: .5rem; overflow-x: auto; }
.note { color: #555; font-size: .85rem; }
#mask-panel { margin: 1rem 0; border: 1px solid #ccc; padding: .5rem 1rem; }
#mask-panel .tools { display: flex; flex-wrap: wrap; gap: .8rem 1.2rem; align-items: end; }
#mask { width: 256px; height: 256px; image-rendering: pixelated; background: #000; cursor: crosshair;
        touch-action: none; border: 1px solid #888; }
.pair { display: flex; gap: 2px; }
.pair canvas { width: 128px; height: 128px; image-rendering: pixelated; }
</style></head>
<body>
<h1>meddiff</h1>
<p id="model" class="note">loading the model…</p>
<form id="form" novalidate>
  <label id="class-row">Class <select id="class"></select></label>
  <label>Images <input id="n" inputmode="numeric"></label>
  <label>Sampler <select id="sampler"></select></label>
  <label>Steps <input id="steps" inputmode="numeric"></label>
  <label id="guidance-row">Guidance <input id="guidance" inputmode="decimal"></label>
  <label>Seed <input id="seed" inputmode="numeric"></label>
  <label>Format <select id="format">
    <option value="png">PNG</option><option value="dicom">DICOM</option>
  </select></label>
  <fieldset id="mask-panel" hidden>
    <legend>Label map (optional): every image of the batch is drawn for it, and comes with it</legend>
    <canvas id="mask" width="1" height="1" aria-label="label map: draw with the mouse or a finger"></canvas>
    <div class="tools">
      <label>Brush label <select id="brush-label"></select></label>
      <label>Brush size <input id="brush-size" type="range" min="1" max="40" value="8"></label>
      <button id="mask-clear" type="button">Clear</button>
      <label>Or load a label image (8-bit PNG) <input id="mask-file" type="file" accept="image/png,image/bmp"></label>
    </div>
    <p class="note">0 is background; the other labels are the values this model was trained on. An empty map
    means no map: the images are then drawn without one.</p>
  </fieldset>
  <button id="generate" type="submit" disabled>Generate</button>
  <button id="cancel" type="button" hidden>Cancel</button>
</form>
<p id="message" role="alert" hidden></p>
<p><progress id="progress" value="0" max="1" hidden></progress> <span id="progress-text"></span></p>
<div id="images"></div>
<p><a id="download" hidden>Download the batch (.zip)</a></p>
<h2>Model card</h2>
<div id="card"></div>
<p class="note">Every image made here is synthetic: it is not an image of a real patient.</p>
<script src="/app.js"></script>
</body></html>
"""

SCRIPT = r""""use strict";
const $ = (id) => document.getElementById(id);

function showMessage(text) { $("message").textContent = text; $("message").hidden = !text; }

async function getJSON(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) { throw new Error((body && body.error) || `the server answered ${response.status}`); }
  return body;
}

function fill(select, values) {
  const option = (v) => Object.assign(document.createElement("option"), {value: v, textContent: v});
  select.replaceChildren(...values.map(option));
}

function setProgress(done, total, text) {
  $("progress").hidden = false; $("progress").max = total; $("progress").value = done;
  $("progress-text").textContent = text;
}

let following = null;  // the URL of the batch being shown, which Cancel stops

// The label map: one label value per pixel at the model's size, drawn with a brush or loaded from a label image,
// sent run-length encoded ([label, count, …], row by row) and shown beside every image it was drawn for.
const mask = {size: 0, values: [], labels: null, painting: false, sent: null};
const PALETTE = [[230, 60, 60], [60, 160, 230], [240, 200, 40], [90, 200, 90], [200, 90, 200], [250, 140, 40]];

function colour(value) {
  return value === 0 ? [0, 0, 0] : PALETTE[Math.max(0, mask.values.indexOf(value)) % PALETTE.length];
}

function drawMask(canvas, labels) {
  canvas.width = canvas.height = mask.size;
  const context = canvas.getContext("2d");
  const image = context.createImageData(mask.size, mask.size);
  labels.forEach((value, i) => {
    image.data.set([...colour(value), 255], 4 * i);
  });
  context.putImageData(image, 0, 0);
}

function paint(event) {
  const box = $("mask").getBoundingClientRect();
  const x = (event.clientX - box.left) * mask.size / box.width, y = (event.clientY - box.top) * mask.size / box.height;
  const r = Number($("brush-size").value) * mask.size / 256, value = Number($("brush-label").value);
  for (let row = Math.max(0, Math.floor(y - r)); row <= Math.min(mask.size - 1, Math.ceil(y + r)); row++) {
    for (let col = Math.max(0, Math.floor(x - r)); col <= Math.min(mask.size - 1, Math.ceil(x + r)); col++) {
      if ((col + 0.5 - x) ** 2 + (row + 0.5 - y) ** 2 <= r * r) { mask.labels[row * mask.size + col] = value; }
    }
  }
  drawMask($("mask"), mask.labels);
}

function encodeMask(labels) {
  if (!labels.some((v) => v !== 0)) { return null; }
  const runs = [];
  let value = labels[0], count = 0;
  for (const v of labels) {
    if (v === value) { count++; } else { runs.push(value, count); value = v; count = 1; }
  }
  runs.push(value, count);
  return runs;
}

async function loadMask(file) {
  showMessage("");
  try {
    const bitmap = await createImageBitmap(file, {colorSpaceConversion: "none", premultiplyAlpha: "none"});
    const canvas = document.createElement("canvas");
    canvas.width = canvas.height = mask.size;
    const context = canvas.getContext("2d");
    context.imageSmoothingEnabled = false;  // nearest neighbour: a label value is never blended into another
    context.drawImage(bitmap, 0, 0, mask.size, mask.size);
    const rgba = context.getImageData(0, 0, mask.size, mask.size).data;
    const labels = new Uint16Array(mask.size * mask.size).map((_v, i) => rgba[4 * i]);
    const found = [...new Set(labels)].filter((v) => v !== 0);
    const unknown = found.filter((v) => !mask.values.includes(v));
    if (unknown.length && found.length === 1) {  // a plain region (e.g. 0/255): the model's first label value
      labels.forEach((v, i) => { if (v) { labels[i] = mask.values[0]; } });
      showMessage(`${file.name}: one region of value ${found[0]}, drawn as label ${mask.values[0]}`);
    } else if (unknown.length) {
      throw new Error(`label value(s) ${unknown.slice(0, 5).join(", ")} this model does not know ` +
                      `(it knows 0 and ${mask.values.join(", ")})`);
    }
    mask.labels = labels;
    drawMask($("mask"), mask.labels);
  } catch (e) { showMessage(`${file.name}: ${e.message}`); }
  $("mask-file").value = "";
}

function setUpMask(info) {
  mask.size = info.size; mask.values = info.mask_values;
  mask.labels = new Uint16Array(mask.size * mask.size);
  fill($("brush-label"), [...mask.values, 0]);
  drawMask($("mask"), mask.labels);
  $("mask").addEventListener("pointerdown", (e) => {
    mask.painting = true; $("mask").setPointerCapture(e.pointerId); paint(e);
  });
  $("mask").addEventListener("pointermove", (e) => { if (mask.painting) { paint(e); } });
  $("mask").addEventListener("pointerup", () => { mask.painting = false; });
  $("mask-clear").addEventListener("click", () => { mask.labels.fill(0); drawMask($("mask"), mask.labels); });
  $("mask-file").addEventListener("change", () => { if ($("mask-file").files.length) { loadMask($("mask-file").files[0]); } });
  $("mask-panel").hidden = false;
}

async function cancel() {
  if (!following) { return; }
  $("cancel").disabled = true;
  try { await getJSON(following, {method: "DELETE"}); } catch (e) { showMessage(e.message); }
}

async function follow(url) {
  let shown = 0;
  for (;;) {
    const job = await getJSON(url);
    for (; shown < job.images.length; shown++) {
      const img = document.createElement("img");
      img.src = job.images[shown]; img.alt = img.title = `seed ${job.seeds[shown]}`;
      if (mask.sent) {  // the pair: the image and the label map it was drawn for
        const map = document.createElement("canvas");
        drawMask(map, mask.sent);
        map.title = `label map of seed ${job.seeds[shown]}`;
        const pair = document.createElement("div");
        pair.className = "pair"; pair.append(img, map);
        $("images").append(pair);
      } else { $("images").append(img); }
    }
    const state = job.status === "queued" ? "waiting for the batch before it" : `${job.done} of ${job.total} images`;
    setProgress(job.done, job.total, state);
    if (job.status === "error") { throw new Error(job.error); }
    if (job.status === "cancelled") {
      setProgress(job.done, job.total, `cancelled after ${job.done} of ${job.total} images`);
      return;
    }
    if (job.status === "done") {
      $("download").href = job.zip; $("download").hidden = false;
      setProgress(job.done, job.total, `done: ${job.total} images`);
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, 300));
  }
}

async function submit(event) {
  event.preventDefault();
  showMessage("");
  const body = {};
  for (const key of ["n", "sampler", "steps", "guidance", "seed", "format"]) { body[key] = $(key).value; }
  if (!$("class-row").hidden) { body.class = $("class").value; }
  const runs = $("mask-panel").hidden ? null : encodeMask(mask.labels);
  if (runs) { body.mask = runs; }
  mask.sent = runs ? mask.labels.slice() : null;
  $("generate").disabled = true; $("download").hidden = true; $("images").replaceChildren();
  try {
    const job = await getJSON("/api/jobs", {method: "POST", headers: {"Content-Type": "application/json"},
                                            body: JSON.stringify(body)});
    setProgress(0, Number(body.n) || 1, "starting");
    following = job.url; $("cancel").disabled = false; $("cancel").hidden = false;
    await follow(job.url);
  } catch (e) {
    showMessage(e.message); $("progress").hidden = true; $("progress-text").textContent = "";
  } finally { $("generate").disabled = false; $("cancel").hidden = true; following = null; }
}

// The model card is Markdown: headings, paragraphs, lists, tables, code blocks, **bold** and `code`, built as
// DOM nodes from text (never as HTML), so nothing in the card can run in the page.
function inline(parent, text) {
  for (const part of text.split(/(\*\*[^*]+\*\*|`[^`]+`)/)) {
    const strong = /^\*\*.+\*\*$/.test(part), code = /^`.+`$/.test(part);
    if (strong || code) {
      const tag = document.createElement(strong ? "strong" : "code");
      tag.textContent = strong ? part.slice(2, -2) : part.slice(1, -1);
      parent.append(tag);
    } else if (part) { parent.append(part); }
  }
  return parent;
}
const node = (tag, text) => inline(document.createElement(tag), text);
const cells = (line) => line.trim().replace(/^\||\|$/g, "").split("|").map((c) => c.trim());
const isBlockStart = (line) => /^(#{1,6}\s|\s*\||```|\s*[-*]\s)/.test(line);

function renderCard(container, markdown) {
  const lines = markdown.replace(/^---\n[\s\S]*?\n---\n/, "").split("\n");
  container.replaceChildren();
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (!line.trim()) { i++; }
    else if (heading) { container.append(node(`h${Math.min(6, heading[1].length + 2)}`, heading[2])); i++; }
    else if (line.startsWith("```")) {
      const body = [];
      for (i++; i < lines.length && !lines[i].startsWith("```"); i++) { body.push(lines[i]); }
      i++;
      container.append(Object.assign(document.createElement("pre"), {textContent: body.join("\n")}));
    } else if (/^\s*\|/.test(line)) {
      const table = document.createElement("table");
      for (let row = 0; i < lines.length && /^\s*\|/.test(lines[i]); i++) {
        if (/^[\s|:-]+$/.test(lines[i])) { continue; }
        const tr = table.insertRow();
        for (const cell of cells(lines[i])) { tr.append(node(row === 0 ? "th" : "td", cell)); }
        row++;
      }
      container.append(table);
    } else if (/^\s*[-*]\s/.test(line)) {
      const list = document.createElement("ul");
      const items = [];
      for (; i < lines.length && lines[i].trim() && !/^(#|\||```)/.test(lines[i].trim()); i++) {
        if (/^\s*[-*]\s/.test(lines[i])) { items.push(lines[i].replace(/^\s*[-*]\s+/, "")); }
        else { items[items.length - 1] += " " + lines[i].trim(); }
      }
      list.append(...items.map((text) => node("li", text)));
      container.append(list);
    } else {
      const text = [];
      for (; i < lines.length && lines[i].trim() && !isBlockStart(lines[i]); i++) { text.push(lines[i].trim()); }
      container.append(node("p", text.join(" ")));
    }
  }
}

async function init() {
  try {
    const info = await getJSON("/api/info");
    $("model").textContent = info.title;
    renderCard($("card"), info.card);
    fill($("sampler"), info.samplers);
    fill($("class"), info.classes);
    $("class-row").hidden = !info.classes.length;
    $("guidance-row").hidden = !info.classes.length && !info.mask_values.length;
    if (info.mask_values.length) { setUpMask(info); }
    for (const [key, value] of Object.entries(info.defaults)) { $(key).value = value; }
    for (const [key, [lo, hi]] of Object.entries(info.limits)) { $(key).placeholder = `${lo} to ${hi}`; }
    $("form").addEventListener("submit", submit);
    $("cancel").addEventListener("click", cancel);
    $("generate").disabled = false;
  } catch (e) { showMessage(`could not load the model: ${e.message}`); }
}

init();
"""
