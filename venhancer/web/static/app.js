// The page of venhancer-web: talks to the JSON API of venhancer/web/server.py.
"use strict";

const $ = (id) => document.getElementById(id);
let settings = [];          // from /api/status: name, default, limits, help
let video = null;           // {upload: id} or {input: name}
let maxUpload = 0;
let planTimer = null;
let planSeq = 0;            // only the latest plan request may update the page
let pollTimer = null;

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

async function api(method, url, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(url, init);
  const data = await response.json().catch(() => ({ error: `${response.status} ${response.statusText}` }));
  if (!response.ok) throw new Error(data.error || `${response.status} ${response.statusText}`);
  return data;
}

function fmt(value) {
  return typeof value === "number" && !Number.isInteger(value) ? String(+value.toFixed(3)) : String(value);
}

function secs(seconds) {
  return typeof seconds === "number" ? `${seconds.toFixed(1)} s` : "–";
}

function duration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "…";
  const s = Math.max(0, Math.round(seconds));
  return s >= 60 ? `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s` : `${s} s`;
}

function fillTable(table, rows) {
  table.replaceChildren(...rows.map(([key, value]) => {
    const tr = document.createElement("tr");
    for (const text of [key, value]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.appendChild(td);
    }
    return tr;
  }));
}

function buildSettings(specs, defaultPrompt) {
  settings = specs;
  $("prompt").value = defaultPrompt;
  const box = $("settings");
  box.replaceChildren();
  for (const spec of specs) {
    const label = document.createElement("label");
    label.title = spec.help;
    label.append(spec.name);
    let input;
    if (spec.choices) {
      input = document.createElement("select");
      for (const choice of spec.choices) input.add(new Option(choice, choice, false, choice === spec.default));
    } else {
      input = document.createElement("input");
      input.type = "number";
      input.value = spec.default;
      input.step = spec.integer ? "1" : "any";
      if (spec.min !== undefined && !spec.min_exclusive) input.min = spec.min;
      if (spec.max !== undefined) input.max = spec.max;
    }
    input.id = `opt-${spec.name}`;
    input.addEventListener("input", schedulePlan);
    label.appendChild(input);
    box.appendChild(label);
  }
  $("opt-solver_mode").addEventListener("change", syncSteps);
  syncSteps();
}

function syncSteps() {
  // Only the normal solver takes a step count; fast always uses its 15 fixed timesteps.
  $("opt-steps").disabled = $("opt-solver_mode").value !== "normal";
}

function options() {
  const result = {};
  for (const spec of settings) {
    const value = $(`opt-${spec.name}`).value;
    result[spec.name] = spec.choices ? value : (value.trim() === "" ? null : Number(value));
  }
  return result;
}

async function refreshStatus() {
  try {
    const status = await api("GET", "/api/status");
    const models = status.models;
    $("models").textContent = models.state === "ready" ? `models ready (${models.detail})`
      : models.state === "loading" ? "models loading…" : `models failed: ${models.error}`;
    $("models").className = models.state === "failed" ? "error-text" : "muted";
    $("queue").textContent = status.queue ? `${status.queue} job(s) running or waiting` : "queue empty";
    return status;
  } catch (err) {
    $("models").textContent = "server not reachable";
    return null;
  }
}

function showInfo(name, info) {
  $("video-info").textContent = info
    ? `${name}: ${info.width}x${info.height} @ ${fmt(info.fps)} fps, ${info.frames} frames${info.audio ? `, audio ${info.audio}` : ""}`
    : "";
}

function setVideo(spec, name, info) {
  video = spec;
  showInfo(name, info);
  schedulePlan();
}

function upload(file) {
  showError("");
  setVideo(null, "", null);
  $("inputs").value = "";
  if (file.size > maxUpload) {
    showError(`the upload is ${(file.size / 1e6).toFixed(1)} MB, over the limit of ${maxUpload / 1e6} MB (--max_upload_mb)`);
    return;
  }
  const bar = $("upload-bar");
  bar.hidden = false;
  const xhr = new XMLHttpRequest();  // fetch reports no upload progress
  xhr.open("POST", "/api/upload");
  xhr.setRequestHeader("Content-Type", "application/octet-stream");
  xhr.setRequestHeader("X-File-Name", encodeURIComponent(file.name));
  xhr.upload.onprogress = (e) => { if (e.lengthComputable) bar.firstElementChild.style.width = `${100 * e.loaded / e.total}%`; };
  xhr.onloadend = () => {
    bar.hidden = true;
    bar.firstElementChild.style.width = "0";
    let data = {};
    try { data = JSON.parse(xhr.responseText); } catch (err) { data = { error: `upload failed (${xhr.status || "no answer"})` }; }
    if (xhr.status === 200) setVideo({ upload: data.upload }, data.name, data.input);
    else showError(data.error);
  };
  xhr.send(file);
}

function schedulePlan() {
  clearTimeout(planTimer);
  planTimer = setTimeout(plan, 250);
}

async function plan() {
  const seq = ++planSeq;
  $("run").disabled = true;
  if (!video) {
    fillTable($("plan"), []);
    $("plan-text").textContent = "Upload or pick a video to see what a run will produce.";
    return;
  }
  try {
    const p = await api("POST", "/api/plan", { video, options: options() });
    if (seq !== planSeq) return;
    showError("");
    showInfo(p.video, p.input);
    fillTable($("plan"), [
      ["output", `${p.width}x${p.height} @ ${fmt(p.fps)} fps, ${p.frames} frames`],
      ["inserted frames", `${p.inserted_per_pair} per pair of input frames`],
      ["temporal windows", `${p.windows.length}: ${p.windows.map((w) => `[${w[0]}, ${w[1]})`).join(" ")}`],
      ["network evaluations", `${p.denoise_steps} steps x ${p.branches} branches x ${p.windows.length} windows = ${p.network_evals}`],
    ]);
    $("plan-text").textContent = p.describe;
    $("run").disabled = false;
  } catch (err) {
    if (seq !== planSeq) return;
    fillTable($("plan"), []);
    $("plan-text").textContent = "";
    showError(err.message);
  }
}

async function run() {
  showError("");
  $("run").disabled = true;
  try {
    const job = await api("POST", "/api/jobs", { video, prompt: $("prompt").value, options: options() });
    location.hash = `job=${job.id}`;
    follow(job.id);
  } catch (err) {
    showError(err.message);
  } finally {
    $("run").disabled = false;
  }
}

function follow(jobId) {
  clearTimeout(pollTimer);
  $("job-box").hidden = false;
  $("result-box").hidden = true;
  const poll = async () => {
    let job;
    try {
      job = await api("GET", `/api/jobs/${jobId}`);
    } catch (err) {
      $("job-state").textContent = err.message;
      return;
    }
    renderJob(job);
    if (job.state === "queued" || job.state === "running") pollTimer = setTimeout(poll, 500);
    else refreshStatus();
  };
  poll();
}

function renderJob(job) {
  const bar = $("job-bar").firstElementChild;
  bar.style.width = `${100 * job.fraction}%`;
  let text;
  if (job.state === "queued") {
    text = job.position > 0 ? `${job.name}: waiting, place ${job.position} in the queue (${job.position} job(s) ahead)`
      : job.models === "loading" ? `${job.name}: waiting for the models to load` : `${job.name}: starting`;
  } else if (job.state === "running") {
    text = job.phase
      ? `${job.name}: ${job.phase} ${job.done}/${job.total} · ${Math.floor(100 * job.fraction)}% · about ${duration(job.eta_s)} left`
      : `${job.name}: reading the video`;
  } else if (job.state === "done") {
    text = `${job.name}: done in ${duration(job.elapsed_s)}`;
    showResult(job);
  } else {
    text = `${job.name}: failed`;
    showError(job.error);
  }
  $("job-state").textContent = text;
}

async function showResult(job) {
  const r = job.result;
  const player = $("result");
  if (player.dataset.job !== job.id) {
    player.dataset.job = job.id;
    player.src = r.video_url;
  }
  $("download").href = `${r.video_url}`;
  $("download").download = r.file_name;
  $("download").textContent = `Download ${r.file_name}`;
  $("sidecar-link").href = r.sidecar_url;
  $("result-box").hidden = false;
  try {
    const s = await api("GET", r.sidecar_url);
    const t = s.timings_s || {};
    fillTable($("figures"), [
      ["output", `${s.output.width}x${s.output.height} @ ${fmt(s.output.fps)} fps, ${s.output.frames} frames (${s.output.codec}, crf ${s.output.crf})`],
      ["input", `${s.input.width}x${s.input.height} @ ${fmt(s.input.fps)} fps, ${s.input.frames} frames`],
      ["prompt", s.prompt],
      ["settings", Object.entries(s.settings).map(([k, v]) => `${k} ${fmt(v)}`).join(", ")],
      ["model", `${s.model.version} on ${s.model.device} (${s.model.precision}${s.model.low_vram ? ", low VRAM" : ""})`],
      ["network evaluations", String(s.plan.network_evals)],
      ["time", `${secs(t.total)} total: read ${secs(t.read)}, encode ${secs(t.encode)}, prompt ${secs(t.text)}, denoise ${secs(t.sample)}, decode + write ${secs(t.decode_write)}`],
    ].concat(t.peak_gpu_memory_reserved_GB ? [["peak GPU memory", `${fmt(t.peak_gpu_memory_reserved_GB)} GB reserved`]] : []));
  } catch (err) {
    showError(err.message);
  }
}

async function start() {
  const status = await refreshStatus();
  if (!status) return;
  maxUpload = status.max_upload_bytes;
  buildSettings(status.settings, status.default_prompt);
  if (status.inputs.length) {
    $("inputs-box").hidden = false;
    for (const name of status.inputs) $("inputs").add(new Option(name, name));
  }
  $("file").addEventListener("change", () => { if ($("file").files.length) upload($("file").files[0]); });
  $("inputs").addEventListener("change", () => {
    showError("");
    $("file").value = "";
    const name = $("inputs").value;
    setVideo(name ? { input: name } : null, name, null);
  });
  $("run").addEventListener("click", run);
  setInterval(refreshStatus, 3000);
  plan();
  const match = /job=([0-9a-f]{16})/.exec(location.hash);
  if (match) follow(match[1]);  // a reload keeps following the job
}

start();
