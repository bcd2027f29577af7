// Following one job in the "current" panel: its event stream drives a progress
// bar per stage; while it waits, the job document gives its place in the queue
// (events do not carry it); when the stream cannot be had or breaks off, the
// panel falls back to polling `GET /jobs/{id}` and says when the server is gone.

import * as api from "./api.js";

const $ = (id) => document.getElementById(id);
const TERMINAL = ["succeeded", "failed", "canceled"];
const POLL_MS = 700;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

let current = null;

function bars(doc) {
  const list = $("current-progress");
  list.replaceChildren();
  for (const s of doc.request.stages) {
    const row = document.createElement("div");
    row.className = "stage-progress";
    row.dataset.stage = s.index;
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = `${s.name}: 0 / ${s.steps}`;
    const bar = document.createElement("progress");
    bar.max = s.steps;
    bar.value = 0;
    row.append(label, bar);
    list.append(row);
  }
}

function setBar(stage, step, total) {
  const row = document.querySelector(`.stage-progress[data-stage="${stage}"]`);
  if (!row) return;
  const bar = row.querySelector("progress");
  bar.max = total;
  bar.value = step;
  row.querySelector(".label").textContent = `${row.querySelector(".label").textContent.split(":")[0]}: ${step} / ${total}`;
}

// Earlier stages are complete once a later one reports.
function progress(p) {
  for (let i = 0; i < p.stage; i++) {
    const bar = document.querySelector(`.stage-progress[data-stage="${i}"] progress`);
    if (bar) setBar(i, bar.max, bar.max);
  }
  setBar(p.stage, p.step, p.total_steps);
}

function status(text, detail = "") {
  $("current-status").textContent = text;
  $("current-detail").textContent = detail;
}

function show(job, doc) {
  if (job !== current) return;
  if (doc.status === "queued") {
    const pos = doc.queue_position;
    status("Queued", pos == null ? "waiting for the worker" : pos === 0 ? "next in the queue" : `${pos} job${pos === 1 ? "" : "s"} ahead`);
  } else if (doc.status === "running") {
    status("Generating", `job ${doc.id.slice(0, 8)}`);
  }
  if (doc.progress) progress(doc.progress);
}

async function finish(job, doc) {
  if (job !== current || job.done) return;
  job.done = true;
  $("cancel").hidden = true;
  if (doc.status === "succeeded") {
    for (const s of doc.request.stages) setBar(s.index, s.steps, s.steps);
    const secs = doc.started_at && doc.completed_at ? ` in ${((Date.parse(doc.completed_at) - Date.parse(doc.started_at)) / 1000).toFixed(1)} s` : "";
    status("Done", `${doc.images.length} image${doc.images.length === 1 ? "" : "s"}${secs}`);
    const images = $("current-images");
    for (const image of doc.images) {
      const img = document.createElement("img");
      img.alt = `${doc.request.prompt} (seed ${image.seed})`;
      img.width = image.width;
      img.height = image.height;
      images.append(img);
      api.imageUrl(image.url).then((url) => (img.src = url), (e) => (img.alt = e.message));
    }
  } else if (doc.status === "failed") {
    status("Failed", doc.error ? doc.error.message : "");
  } else {
    status("Canceled");
  }
  job.onDone(doc);
}

// The document every POLL_MS until the job ends; says so while the server is away.
async function poll(job) {
  let failures = 0;
  while (job === current && !job.done) {
    try {
      const doc = await api.job(job.id);
      failures = 0;
      if (TERMINAL.includes(doc.status)) return finish(job, doc);
      show(job, doc);
    } catch (e) {
      if (e.status !== 0) return status("Lost", e.message);
      failures++;
      status("Server unreachable", `retrying… (${failures})`);
    }
    await sleep(Math.min(POLL_MS * 2 ** Math.min(failures, 4), 10000));
  }
}

// Refreshes the queue position while the job waits (the events say only "queued").
async function watchQueue(job) {
  while (job === current && !job.done && job.queued) {
    await sleep(POLL_MS);
    try {
      const doc = await api.job(job.id);
      job.queued = doc.status === "queued";
      if (!job.done) show(job, doc);
    } catch {
      return;
    }
  }
}

async function stream(job) {
  const onEvent = (name, data) => {
    if (job !== current) return;
    if (name === "state") {
      job.queued = data.status === "queued";
      if (TERMINAL.includes(data.status)) return finish(job, data);
      show(job, data);
      if (job.queued) watchQueue(job);
    } else if (name === "started") {
      job.queued = false;
      status("Generating", `job ${job.id.slice(0, 8)}`);
    } else if (name === "progress") {
      // The first progress may be the first sign of running (a missed `started`).
      if (job.queued) status("Generating", `job ${job.id.slice(0, 8)}`);
      job.queued = false;
      progress(data);
    } else if (name === "stage_done") {
      const bar = document.querySelector(`.stage-progress[data-stage="${data.stage}"] progress`);
      if (bar) setBar(data.stage, bar.max, bar.max);
    } else if (TERMINAL.includes(name)) {
      finish(job, data);
    }
  };
  try {
    await api.events(job.id, onEvent, job.abort.signal);
  } catch (e) {
    if (job.abort.signal.aborted) return;
  }
  // Ended without a terminal event (or broke off): the document decides.
  if (!job.done && job === current) await poll(job);
}

/** Shows `doc` in the current panel and follows it; `onDone(doc)` when it ends. */
export function follow(doc, onDone) {
  if (current) current.abort.abort();
  const job = { id: doc.id, done: false, queued: doc.status === "queued", abort: new AbortController(), onDone };
  current = job;
  $("current").hidden = false;
  $("current-images").replaceChildren();
  $("cancel").hidden = false;
  $("cancel").disabled = false;
  bars(doc);
  show(job, doc);
  stream(job);
}

/** Cancels the job in the panel. */
export async function cancelCurrent() {
  const job = current;
  if (!job || job.done) return;
  $("cancel").disabled = true;
  try {
    const doc = await api.cancel(job.id);
    if (TERMINAL.includes(doc.status)) await finish(job, doc);
  } catch (e) {
    $("cancel").disabled = false;
    status("Cancel failed", e.message);
  }
}
