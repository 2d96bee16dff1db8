// interleaf viewer: submit a prompt, read the server-sent events of the answer, grow the document.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  limits: null,
  model: null,
  options: [],       // the sampling options, as /api/model describes them
  fieldsFor: {},     // option name -> the label and input shown for it
  jobId: null,
  abort: null,
  running: false,
  prompt: null,      // {text, images: [data URLs]} of the request being shown
  settings: null,    // options as sent, plus the seed the server used
  stats: null,       // the `done` event
  textNode: null,    // the text block the next delta goes into
  figures: {},       // image index -> figure element
};

// ---- start-up: the model's description, limits, and every sampling option -------------------

function optionInput(option, value) {
  let input;
  if (option.type === "choice") {
    input = document.createElement("select");
    for (const choice of option.choices) input.append(new Option(choice, choice));
  } else {
    input = document.createElement("input");
    input.type = "number";
    input.step = option.type === "int" ? "1" : "any";
    // bounds the browser can hold exactly; the server checks every value anyway
    if (option.min !== null && Math.abs(option.min) < 1e15) input.min = option.min;
    if (option.max !== null && Math.abs(option.max) < 1e15) input.max = option.max;
    if (option.nullable || value === null) input.placeholder = option.name === "seed" ? "random" : "auto";
  }
  input.id = input.name = option.name;
  input.title = option.help;
  if (value !== null && value !== undefined) input.value = value;
  return input;
}

function buildOptions(options, defaults) {
  state.options = options;
  for (const option of options) {
    const label = document.createElement("label");
    label.htmlFor = option.name;
    label.textContent = option.label;
    label.title = option.help;
    const input = optionInput(option, defaults[option.name]);
    $(`group-${option.group}`).querySelector(".grid").append(label, input);
    state.fieldsFor[option.name] = [label, input];
  }
  $("mode").addEventListener("change", showOptionsForMode);
  showOptionsForMode();
}

// Only the options that act in the chosen mode are shown (and sent): no text temperature while
// drawing an image, no image guidance while writing text.
function showOptionsForMode() {
  const mode = $("mode").value;
  for (const option of state.options) {
    for (const element of state.fieldsFor[option.name]) element.hidden = !option.modes.includes(mode);
  }
  for (const group of document.querySelectorAll("fieldset.options")) {
    group.hidden = [...group.querySelectorAll("input, select")].every((input) => input.hidden);
  }
}

function shownOptions() {
  return state.options.filter((option) => !state.fieldsFor[option.name][1].hidden);
}

async function loadInfo() {
  try {
    const response = await fetch("/api/model");
    const info = await response.json();
    state.model = info.model;
    state.limits = info.limits;
    const m = info.model;
    const parts = [m.name, `${m.parameters_human} parameters`, `vocabulary ${m.vocab_size}`,
                   `${m.tokens_per_image} tokens per image (${m.image_grid.join("×")})`,
                   `${m.device} ${m.dtype}`];
    if (!m.can_draw) parts.push("cannot draw (no image decoder)");
    $("model-info").textContent = parts.join(" · ");
    $("prompt").maxLength = info.limits.max_prompt_chars;
    buildOptions(info.options, info.defaults);
    $("max_new_tokens").max = info.limits.max_new_tokens;
    $("max_images").max = info.limits.max_images;
  } catch (err) {
    $("model-info").textContent = `cannot reach the server: ${err}`;
  }
}

// ---- uploads ---------------------------------------------------------------------------

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function showThumbs() {
  const thumbs = $("thumbs");
  thumbs.replaceChildren();
  for (const file of $("images").files) {
    const img = document.createElement("img");
    img.alt = file.name;
    img.title = file.name;
    img.src = await readAsDataURL(file);
    thumbs.append(img);
  }
}

function checkUploads(files) {
  const limits = state.limits;
  if (!limits) return null;
  if (files.length > limits.max_uploads) return `at most ${limits.max_uploads} images per request`;
  for (const file of files) {
    if (file.size > limits.max_upload_bytes) {
      const mb = (limits.max_upload_bytes / 1048576).toFixed(1);
      return `${file.name} is over the upload limit of ${mb} MB`;
    }
  }
  return null;
}

// ---- the document -------------------------------------------------------------------------

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function figure(src, caption) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.alt = caption;
  if (src) img.src = src;
  const cap = document.createElement("figcaption");
  cap.textContent = caption;
  fig.append(img, cap);
  return fig;
}

function showPrompt(prompt) {
  const doc = $("doc");
  doc.replaceChildren();
  const box = document.createElement("div");
  box.className = "prompt";
  box.dataset.role = "prompt";
  prompt.images.forEach((src, i) => box.append(figure(src, `prompt image ${i + 1}`)));
  const text = document.createElement("div");
  text.className = "text";
  text.textContent = prompt.text;
  box.append(text);
  doc.append(box);
  state.textNode = null;
  state.figures = {};
}

function appendText(text) {
  if (!state.textNode) {
    state.textNode = document.createElement("div");
    state.textNode.className = "text generated";
    $("doc").append(state.textNode);
  }
  state.textNode.textContent += text;
}

function startImage(index, total) {
  const fig = figure(null, `image ${index + 1}: 0 / ${total} tokens`);
  fig.classList.add("generated", "partial");
  fig.dataset.index = index;
  const blank = document.createElement("div");
  blank.className = "blank";
  fig.querySelector("img").replaceWith(blank);
  const bar = document.createElement("div");
  bar.className = "progress";
  bar.append(document.createElement("div"));
  fig.insertBefore(bar, fig.querySelector("figcaption"));
  $("doc").append(fig);
  state.figures[index] = fig;
  state.textNode = null;  // text after an image starts a new block
}

function setImage(fig, src) {
  let img = fig.querySelector("img");
  if (!img) {
    img = document.createElement("img");
    fig.querySelector(".blank").replaceWith(img);
  }
  img.src = src;
}

function progressImage(data) {
  const fig = state.figures[data.index];
  if (!fig) return;
  fig.querySelector(".progress > div").style.width = `${(100 * data.tokens_done) / data.tokens_total}%`;
  fig.querySelector("figcaption").textContent =
    `image ${data.index + 1}: ${data.tokens_done} / ${data.tokens_total} tokens`;
  if (data.preview) setImage(fig, data.preview);
}

function finishImage(data) {
  const fig = state.figures[data.index] || figure(null, "");
  setImage(fig, data.image);
  fig.querySelector("img").alt = `generated image ${data.index + 1}`;
  fig.classList.remove("partial");
  fig.classList.add("done");
  fig.querySelector("figcaption").textContent = `image ${data.index + 1} (${data.width}×${data.height})`;
}

// ---- the request and its event stream -------------------------------------------------------

const HANDLERS = {
  queued(d) {
    state.jobId = d.id;
    setStatus(d.ahead > 0 ? `queued: position ${d.position}, ${d.ahead} ahead` : "starting…");
  },
  start(d) {
    state.jobId = d.id;
    state.settings.seed = d.seed;
    setStatus(`generating… (seed ${d.seed})`);
  },
  text(d) { appendText(d.text); },
  image_start(d) { startImage(d.index, d.tokens_total); setStatus(`drawing image ${d.index + 1}…`); },
  image_progress(d) { progressImage(d); },
  image_done(d) { finishImage(d); setStatus("generating…"); },
  done(d) {
    state.stats = d;
    setStatus(`done in ${d.seconds.toFixed(2)} s`);
    $("stats").textContent = `${d.n_prompt_tokens} prompt tokens · ${d.n_generated_tokens} generated · ` +
      `${d.tokens_per_s.toFixed(1)} tokens/s · ${d.seconds.toFixed(2)} s · ` +
      `queued ${d.queue_seconds.toFixed(2)} s · seed ${state.settings.seed}`;
    $("download").disabled = false;
  },
  cancelled() { setStatus("cancelled"); },
  error(d) { setStatus(`error: ${d.message}`, true); },
};

function parseEvent(block) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
  }
  return data.length ? [name, JSON.parse(data.join("\n"))] : null;
}

async function readEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = parseEvent(buffer.slice(0, cut));
      buffer = buffer.slice(cut + 2);
      if (event && HANDLERS[event[0]]) HANDLERS[event[0]](event[1]);
    }
  }
}

function setRunning(running) {
  state.running = running;
  $("run").disabled = running;
  $("cancel").disabled = !running;
}

async function submit(event) {
  event.preventDefault();
  if (state.running) return;
  const files = [...$("images").files];
  const problem = checkUploads(files);
  if (problem) { setStatus(problem, true); return; }

  const body = new FormData();
  body.append("prompt", $("prompt").value);
  state.settings = {};
  for (const { name } of shownOptions()) {
    const value = $(name).value.trim();
    if (value !== "") { body.append(name, value); state.settings[name] = value; }
  }
  files.forEach((file) => body.append("image", file, file.name));
  state.prompt = { text: $("prompt").value, images: await Promise.all(files.map(readAsDataURL)) };
  state.stats = null;
  state.jobId = null;
  $("download").disabled = true;
  $("stats").textContent = "";
  showPrompt(state.prompt);
  setRunning(true);
  setStatus("sending…");

  state.abort = new AbortController();
  try {
    const response = await fetch("/api/generate", { method: "POST", body, signal: state.abort.signal });
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
      setStatus(message, true);
      return;
    }
    await readEvents(response);
  } catch (err) {
    if (err.name === "AbortError") setStatus("cancelled");
    else setStatus(`connection lost: ${err.message}`, true);
  } finally {
    setRunning(false);
    state.abort = null;
  }
}

async function cancel() {
  if (!state.running) return;
  $("cancel").disabled = true;
  setStatus("cancelling…");
  if (!state.jobId) { state.abort.abort(); return; }  // not queued yet: just drop the request
  try {
    await fetch(`/api/jobs/${encodeURIComponent(state.jobId)}/cancel`, { method: "POST" });
  } catch (_) {
    state.abort.abort();
  }
}

// ---- download: one self-contained HTML file ----------------------------------------------

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function documentHtml() {
  const parts = [];
  for (const node of $("doc").querySelectorAll(".generated")) {
    if (node.tagName === "FIGURE") {
      const img = node.querySelector("img");
      if (img) parts.push(`<figure><img src="${img.src}" alt="${escapeHtml(img.alt)}"></figure>`);
    } else {
      parts.push(`<div class="text">${escapeHtml(node.textContent)}</div>`);
    }
  }
  const promptImages = state.prompt.images
    .map((src, i) => `<figure><img src="${src}" alt="prompt image ${i + 1}"></figure>`).join("");
  const settings = Object.entries(state.settings).map(([k, v]) => `${k}=${escapeHtml(String(v))}`).join(", ");
  const model = state.model ? escapeHtml(`${state.model.name} (${state.model.parameters_human} parameters)`) : "";
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>interleaf document</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 48rem; margin: 2rem auto; line-height: 1.5; color: #1d232b; }
.text { white-space: pre-wrap; } figure { display: inline-block; margin: 0.5rem 0.5rem 0.5rem 0; }
img { width: 256px; image-rendering: pixelated; border: 1px solid #ddd; }
.prompt { background: #eef3ef; padding: 0.5rem 1rem; border-radius: 6px; } .prompt img { width: 96px; }
.meta { color: #6b7280; font-size: 0.85rem; }
</style></head><body>
<h1>interleaf document</h1>
<p class="meta">model ${model} · ${escapeHtml(settings)}</p>
<section class="prompt"><h2>Prompt</h2>${promptImages}<div class="text">${escapeHtml(state.prompt.text)}</div></section>
<section><h2>Generated</h2>
${parts.join("\n")}
</section>
<p class="meta">${escapeHtml($("stats").textContent)}</p>
</body></html>
`;
}

function download() {
  if (!state.stats) return;
  const blob = new Blob([documentHtml()], { type: "text/html" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `interleaf-${state.settings.seed ?? "document"}.html`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

window.addEventListener("DOMContentLoaded", () => {
  $("form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancel);
  $("download").addEventListener("click", download);
  $("images").addEventListener("change", showThumbs);
  loadInfo();
});
