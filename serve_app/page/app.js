// The try-it page: pick a model and a task, give an image and the task's text, send it to the API, show the
// answer. It only calls the HTTP API next to it (README, "Serving"): GET v1/models for the models and their tasks,
// POST v1/<route> as a multipart form (the image as a file part named "image", the rest in a "json" part).
// Prompts and preprocessing are the model's; this page adds none.
"use strict";

// The image tasks of the API: route, and what the item takes besides the image.
const TASKS = {
  caption: { label: "Caption", route: "v1/caption" },
  vqa: {
    label: "Question (VQA)", route: "v1/vqa", text: "Question", placeholder: "what shape is red?",
    candidates: "Candidate answers (optional: score only these)",
  },
  grounding: { label: "Grounding", route: "v1/grounding", text: "Phrase to locate", placeholder: "the red circle" },
  visual_entailment: {
    label: "Entailment", route: "v1/entailment", text: "Hypothesis", placeholder: "there is a circle",
  },
  image_classification: {
    label: "Classify", route: "v1/classify", candidates: "Labels", required: ["candidates"],
    placeholder: "circle, square, triangle",
  },
};
const RESULT_KEYS = new Set(["score", "scores", "alternatives", "error"]); // beside the answer in a result
const KEY_STORE = "ofa-api-key"; // sessionStorage only: the key goes away with the tab

const $ = (id) => document.getElementById(id);
const state = { models: [], task: null, image: null }; // image: {blob, name, url}

// ------------------------------------------------------------------------------------------- the API

function apiKey() {
  return sessionStorage.getItem(KEY_STORE);
}

// One API call: {ok, status, body, error: {reason, message}, ms, requestId}. Never throws.
async function call(path, init = {}) {
  const headers = new Headers(init.headers || {});
  const key = apiKey();
  if (key) headers.set("X-API-Key", key);
  const started = performance.now();
  let response;
  try {
    response = await fetch(path, { ...init, headers });
  } catch (err) {
    return { ok: false, status: 0, ms: performance.now() - started,
             error: { reason: "no_answer", message: `the server did not answer (${err.message})` } };
  }
  const text = await response.text();
  const ms = performance.now() - started;
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    // not JSON: a proxy's page, say; its text becomes the message below
  }
  const requestId = (body && body.request_id) || response.headers.get("x-request-id");
  if (response.ok && body) return { ok: true, status: response.status, body, ms, requestId };
  const error = body && body.error && body.error.reason
    ? body.error
    : { reason: `http_${response.status}`, message: text.slice(0, 500) || response.statusText };
  return { ok: false, status: response.status, body, error, ms, requestId };
}

// ------------------------------------------------------------------------------------------- models and tasks

async function loadModels() {
  const got = await call("v1/models");
  if (got.status === 401) {
    const refused = apiKey();
    sessionStorage.removeItem(KEY_STORE);
    askForKey(refused ? "That API key was refused: " + got.error.message : null);
    $("model").innerHTML = "<option>API key needed</option>";
    return;
  }
  if (!got.ok) {
    showError(got);
    $("model").innerHTML = "<option>no models</option>";
    return;
  }
  $("key-panel").hidden = true;
  state.models = got.body.models;
  const select = $("model");
  select.replaceChildren(...state.models.map((m) => {
    const option = document.createElement("option");
    option.value = m.name;
    option.textContent = m.version ? `${m.name} (version ${m.version})` : m.name;
    return option;
  }));
  select.disabled = state.models.length === 0;
  chooseModel();
}

function chosenModel() {
  return state.models.find((m) => m.name === $("model").value);
}

function chooseModel() {
  const model = chosenModel();
  if (!model) return;
  const tasks = Object.keys(TASKS).filter((t) => model.tasks.includes(t)); // in the order above
  const source = model.registered_name ? `${model.registered_name} version ${model.version}` : model.source;
  $("model-note").textContent = `${source} · on ${model.device}` +
    (tasks.length ? "" : " · serves no image task here");
  const group = $("tasks");
  group.replaceChildren(...tasks.map((name) => {
    const button = document.createElement("button");
    button.type = "button";
    button.setAttribute("role", "radio");
    button.dataset.task = name;
    button.textContent = TASKS[name].label;
    button.addEventListener("click", () => chooseTask(name));
    return button;
  }));
  chooseTask(tasks.includes(state.task) ? state.task : tasks[0] || null);
}

function chooseTask(name) {
  state.task = name;
  for (const button of $("tasks").children) {
    button.setAttribute("aria-checked", String(button.dataset.task === name));
  }
  const task = TASKS[name] || {};
  $("text-field").hidden = !task.text;
  $("text-label").textContent = task.text || "";
  $("text").placeholder = task.placeholder && task.text ? `e.g. ${task.placeholder}` : "";
  $("candidates-field").hidden = !task.candidates;
  $("candidates-label").textContent = task.candidates || "";
  if (task.candidates && !task.text) $("candidates").placeholder = `comma-separated, e.g. ${task.placeholder}`;
  clearAnswer();
  updateRunButton();
}

// ------------------------------------------------------------------------------------------- the image

function useImage(blob, name) {
  if (state.image) URL.revokeObjectURL(state.image.url);
  state.image = { blob, name, url: URL.createObjectURL(blob) };
  $("preview").src = state.image.url;
  $("stage").classList.remove("empty", "unreadable");
  $("placeholder").textContent = "No image yet";
  clearAnswer();
  updateRunButton();
}

async function useExample(button) {
  for (const other of document.querySelectorAll(".example")) other.classList.toggle("chosen", other === button);
  const response = await fetch(button.dataset.src);
  useImage(await response.blob(), button.dataset.src.split("/").pop());
  if (state.task === "grounding" && !$("text").value) $("text").value = button.dataset.hint;
}

function setUpImageInputs() {
  $("file").addEventListener("change", () => {
    const file = $("file").files[0];
    if (file) useImage(file, file.name);
    for (const other of document.querySelectorAll(".example")) other.classList.remove("chosen");
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) useImage(file, file.name);
  });
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") $("file").click();
  });
  for (const button of document.querySelectorAll(".example")) {
    button.addEventListener("click", () => useExample(button));
  }
}

// ------------------------------------------------------------------------------------------- asking

function updateRunButton() {
  $("run").disabled = !(state.task && state.image && chosenModel());
}

function candidates() {
  return $("candidates").value.split(",").map((c) => c.trim()).filter(Boolean);
}

// The request's item: what the user typed for the task (the image goes as a file part).
function item() {
  const task = TASKS[state.task];
  const out = {};
  if (task.text) out.text = $("text").value;
  if (task.candidates && candidates().length) out.candidates = candidates();
  if (state.task === "vqa" && out.candidates) out.mode = "allcand"; // score exactly these answers
  return out;
}

async function run(event) {
  event.preventDefault();
  if ($("run").disabled) return;
  const model = chosenModel().name;
  const form = new FormData();
  form.append("json", JSON.stringify({ model, items: [item()] }));
  form.append("image", state.image.blob, state.image.name);
  clearAnswer();
  $("busy").hidden = false;
  $("run").disabled = true;
  const got = await call(TASKS[state.task].route, { method: "POST", body: form });
  $("busy").hidden = true;
  updateRunButton();
  if (got.status === 401) askForKey("The server asks for an API key: " + got.error.message);
  showMeta(got);
  if (!got.ok) {
    showError(got);
    return;
  }
  const result = got.body.results[0];
  if (result.error) showError({ ...got, error: result.error });
  else showResult(result);
}

// ------------------------------------------------------------------------------------------- showing

function clearAnswer() {
  for (const id of ["error", "result", "meta", "raw-box"]) $(id).hidden = true;
  $("boxes").replaceChildren();
  $("scores").replaceChildren();
}

function showError(got) {
  $("error-reason").textContent = got.error.reason;
  $("error-message").textContent = got.error.message;
  $("error").hidden = false;
}

function showMeta(got) {
  const server = got.body && typeof got.body.latency_ms === "number" ? `${got.body.latency_ms.toFixed(1)} ms on the server · ` : "";
  $("latency").textContent = `${server}${Math.round(got.ms)} ms round trip`;
  $("request-id").textContent = got.requestId || "(none)";
  $("answered-by").textContent = got.body && got.body.model
    ? `${got.body.model}${got.body.version ? ` version ${got.body.version}` : ""} · ${got.body.task}` : "";
  $("meta").hidden = false;
  if (got.body) {
    $("raw").textContent = JSON.stringify(got.body, null, 2);
    $("raw-box").hidden = false;
  }
}

function showResult(result) {
  const key = Object.keys(result).find((k) => !RESULT_KEYS.has(k));
  const answer = result[key];
  $("answer-key").textContent = key;
  $("answer").textContent = key === "box" ? answer.map((v) => v.toFixed(1)).join(", ") : String(answer);
  $("score").textContent = typeof result.score === "number" ? result.score.toFixed(4) : "—";
  if (key === "box") drawBox(answer, state.task === "grounding" ? $("text").value : "");
  if (result.scores) showScores(result.scores);
  $("result").hidden = false;
}

// A box in image pixels over the shown image, in percent of its natural size, so it follows any display size.
function drawBox([x0, y0, x1, y1], label) {
  const img = $("preview");
  const w = img.naturalWidth;
  const h = img.naturalHeight;
  const box = document.createElement("div");
  box.className = "box";
  box.dataset.box = JSON.stringify([x0, y0, x1, y1]);
  box.classList.toggle("right", x0 > w / 2); // keep the label over the image
  box.classList.toggle("below", y0 < h / 10);
  Object.assign(box.style, {
    left: `${(100 * x0) / w}%`, top: `${(100 * y0) / h}%`,
    width: `${(100 * (x1 - x0)) / w}%`, height: `${(100 * (y1 - y0)) / h}%`,
  });
  if (label) {
    const tag = document.createElement("span");
    tag.textContent = label;
    box.append(tag);
  }
  $("boxes").append(box);
}

function showScores(scores) {
  const ranked = Object.entries(scores).sort((a, b) => b[1] - a[1]);
  $("scores").replaceChildren(...ranked.map(([name, p]) => {
    const li = document.createElement("li");
    const label = document.createElement("span");
    label.textContent = name;
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("i");
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    bar.append(fill);
    const value = document.createElement("span");
    value.className = "p";
    value.textContent = p.toFixed(3);
    li.append(label, bar, value);
    return li;
  }));
}

// ------------------------------------------------------------------------------------------- the API key

function askForKey(note) {
  $("key-panel").hidden = false;
  if (note) $("key-note").textContent = note;
  $("api-key").focus();
}

function setUpKeyForm() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
    $("api-key").value = "";
    loadModels();
  });
}

// ------------------------------------------------------------------------------------------- start

document.addEventListener("DOMContentLoaded", () => {
  setUpKeyForm();
  setUpImageInputs();
  $("model").addEventListener("change", chooseModel);
  $("preview").addEventListener("error", () => { // the browser cannot show it; the server will say what it is
    $("stage").classList.add("unreadable");
    $("placeholder").textContent = `${state.image.name}: this browser cannot show it`;
  });
  $("ask").addEventListener("submit", run);
  loadModels();
});
