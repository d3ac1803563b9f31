// medvlp viewer: upload a study, show finding probabilities and each finding's grounding heatmap over the image,
// and score sentences about it against each other (POST /v1/score: "left" set against "right", "no ...").
// The API key stays in this tab's sessionStorage (gone when the tab closes) and is sent as a Bearer token.
"use strict";

const KEY = "medvlp.apiKey";
const $ = (id) => document.getElementById(id);
let lastAnswer = null;

function apiKey() {
  return sessionStorage.getItem(KEY) || "";
}

function headers() {
  const key = apiKey();
  return key ? { Authorization: "Bearer " + key } : {};
}

function showError(err) {
  const box = $("error");
  box.textContent = err ? `${err.code}: ${err.message}` : "";
  box.hidden = !err;
}

async function call(path, options) {
  let res;
  try {
    res = await fetch(path, { ...options, headers: { ...headers(), ...(options && options.headers) } });
  } catch (e) {
    throw { code: "network_error", message: "the server cannot be reached" };
  }
  let body = null;
  try {
    body = await res.json();
  } catch (e) {
    body = null;
  }
  if (!res.ok) {
    throw (body && body.error) || { code: "http_" + res.status, message: res.statusText };
  }
  return body;
}

async function loadModel() {
  try {
    const info = await call("/v1/model");
    const c = info.cohort || {};
    const auroc = info.metrics && info.metrics["zero-shot mean AUROC"];
    $("model-info").textContent =
      `Model trained on ${c.cohort || "?"} (${c.modality || "?"}, ${c.spatial_dims}D); ` +
      `findings: ${info.findings.join(", ") || "none"}` +
      (typeof auroc === "number" ? `; zero-shot mean AUROC ${auroc.toFixed(3)}` : "");
    $("findings").placeholder = info.findings.join(", ") || "name the findings";
    $("top-k").disabled = !info.retrieval.available;
    if (!info.retrieval.available) $("top-k").value = 0;
    showError(null);
  } catch (err) {
    $("model-info").textContent = "Enter a valid API key to see the model.";
    if (err.code !== "unauthorized" || apiKey()) showError(err);
  }
}

function pct(p) {
  return (100 * p).toFixed(1) + "%";
}

function select(index) {
  const rows = document.querySelectorAll("#predictions tbody tr");
  rows.forEach((r, i) => r.classList.toggle("selected", i === index));
  const pred = lastAnswer.predictions[index];
  const base = pred.slice_png || lastAnswer.image_png;
  if (base) {
    $("base-image").src = "data:image/png;base64," + base;
    $("view").hidden = false;
  }
  const overlay = $("overlay");
  if (pred.heatmap_png) {
    overlay.src = "data:image/png;base64," + pred.heatmap_png;
    overlay.hidden = false;
    $("view-title").textContent =
      `Grounding: ${pred.finding}` + (pred.slice !== undefined && pred.slice !== null ? ` (slice ${pred.slice})` : "");
  } else {
    overlay.hidden = true;
    $("view-title").textContent = "Image";
  }
}

function render(answer) {
  lastAnswer = answer;
  const tbody = document.querySelector("#predictions tbody");
  tbody.replaceChildren();
  answer.predictions.forEach((p, i) => {
    const tr = document.createElement("tr");
    tr.dataset.finding = p.finding;
    const name = document.createElement("td");
    name.textContent = p.finding;
    const prob = document.createElement("td");
    prob.className = "prob";
    prob.textContent = pct(p.probability);
    const barCell = document.createElement("td");
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = pct(p.probability);
    bar.appendChild(fill);
    barCell.appendChild(bar);
    tr.append(name, prob, barCell);
    tr.addEventListener("click", () => select(i));
    tbody.appendChild(tr);
  });
  $("results").hidden = false;
  const w = answer.warnings || [];
  $("warnings").textContent = w.join(" ");
  $("warnings").hidden = w.length === 0;
  const im = answer.image;
  $("image-info").textContent =
    `${im.spatial_dims}D image ${im.shape.join(" x ")}` + (im.modality ? `, ${im.modality}` : "") +
    `; answered in a batch of ${answer.batch_size}.`;
  const list = $("similar-list");
  list.replaceChildren();
  (answer.similar_reports || []).forEach((s) => {
    const li = document.createElement("li");
    const id = document.createElement("div");
    id.className = "study";
    id.textContent = `${s.study} (similarity ${s.score.toFixed(3)})`;
    const text = document.createElement("div");
    text.textContent = s.report;
    li.append(id, text);
    list.appendChild(li);
  });
  $("similar").hidden = !(answer.similar_reports && answer.similar_reports.length);
  if (answer.predictions.length) {
    let best = 0;
    answer.predictions.forEach((p, i) => {
      if (p.probability > answer.predictions[best].probability) best = i;
    });
    select(best);
  }
}

async function diagnose(event) {
  event.preventDefault();
  const file = $("file").files[0];
  if (!file) return;
  const form = new FormData();
  form.append("file", file, "upload");  // the real file name may name the patient: it is not sent
  const findings = $("findings").value.trim();
  if (findings) form.append("findings", findings);
  form.append("heatmaps", $("heatmaps").checked ? "true" : "false");
  form.append("top_k", String(Number($("top-k").value) || 0));
  $("diagnose").disabled = true;
  $("status").textContent = "Reading the study and running the model...";
  showError(null);
  try {
    const t0 = performance.now();
    render(await call("/v1/diagnose", { method: "POST", body: form }));
    $("status").textContent = `Done in ${((performance.now() - t0) / 1000).toFixed(2)} s.`;
  } catch (err) {
    $("status").textContent = "";
    showError(err);
  } finally {
    $("diagnose").disabled = false;
  }
}

function renderScores(answer) {
  const tbody = document.querySelector("#scores tbody");
  tbody.replaceChildren();
  const ranked = answer.scores.slice().sort((a, b) => b.score - a.score);
  ranked.forEach((s) => {
    const tr = document.createElement("tr");
    const text = document.createElement("td");
    text.textContent = s.text;
    const value = document.createElement("td");
    value.className = "score";
    value.textContent = s.score.toFixed(3);
    const check = document.createElement("td");
    check.textContent = s.checked ? (s.side_check >= 0 ? "+" : "") + s.side_check.toFixed(3) : "-";
    tr.append(text, value, check);
    tbody.appendChild(tr);
  });
  $("scores").hidden = false;
  $("score-info").textContent = answer.side_check
    ? "Scores include the model's side check for one-sided sentences (the image's halves read for left and right)."
    : "This model has no side check: scores are the cosines of the image and sentence embeddings.";
}

async function scoreSentences(event) {
  event.preventDefault();
  const file = $("file").files[0];
  const texts = $("sentences").value.split("\n").map((t) => t.trim()).filter((t) => t);
  if (!file || !texts.length) {
    showError({ code: "validation_error", message: "choose a study and write at least one sentence" });
    return;
  }
  const form = new FormData();
  form.append("file", file, "upload");  // as for a diagnosis: the real file name is not sent
  form.append("texts", JSON.stringify(texts));
  $("score").disabled = true;
  $("status").textContent = "Scoring the sentences...";
  showError(null);
  try {
    renderScores(await call("/v1/score", { method: "POST", body: form }));
    $("status").textContent = "";
  } catch (err) {
    $("status").textContent = "";
    showError(err);
  } finally {
    $("score").disabled = false;
  }
}

function init() {
  $("api-key").value = apiKey();
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY, $("api-key").value.trim());
    loadModel();
  });
  $("key-clear").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    $("api-key").value = "";
    $("model-info").textContent = "Enter the API key to see the model.";
  });
  $("diagnose-form").addEventListener("submit", diagnose);
  $("score-form").addEventListener("submit", scoreSentences);
  $("opacity").addEventListener("input", (e) => {
    $("overlay").style.opacity = String(Number(e.target.value) / 100);
  });
  loadModel();
}

document.addEventListener("DOMContentLoaded", init);
