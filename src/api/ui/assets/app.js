// The playground's entry point: loads `/info` (asking for a key when the
// server answers 401), builds the form, submits async jobs, and shows every
// refusal — the field a 422 names, a 429's countdown to its automatic retry
// (Retry-After), a server that is not ready or not there.

import * as api from "./api.js";
import { buildForm, clearFieldErrors, fillForm, markField, randomSeed, readBody } from "./form.js";
import { cancelCurrent, follow } from "./job.js";
import * as gallery from "./gallery.js";

const $ = (id) => document.getElementById(id);
const DEFAULT_RETRY_SECS = 5;

let ready = false;
let retryTimer = null;

function banner(text) {
  $("banner").hidden = !text;
  $("banner").textContent = text || "";
}

function clearError() {
  clearInterval(retryTimer);
  retryTimer = null;
  $("error").hidden = true;
  $("error").replaceChildren();
  clearFieldErrors();
}

// Shows `e` under the form; with `retry`, counts down Retry-After and calls it.
function showError(e, retry) {
  const box = $("error");
  const head = document.createElement("strong");
  head.textContent = e.status ? `${e.status} ${e.type}` : "Server unreachable";
  const message = document.createElement("span");
  message.className = "message";
  message.textContent = e.message;
  box.replaceChildren(head, " ", message);
  box.hidden = false;
  if (e.param) markField(e.param, e.message);
  if (e.status === 401) showAuth(true);
  if (retry && (e.status === 429 || e.status === 503)) {
    let left = e.retryAfter ?? DEFAULT_RETRY_SECS;
    const countdown = document.createElement("span");
    countdown.className = "retry";
    box.append(" ", countdown);
    const tick = () => {
      countdown.textContent = `Retrying in ${left} s…`;
      if (left-- <= 0) {
        clearInterval(retryTimer);
        retryTimer = null;
        retry();
      }
    };
    tick();
    retryTimer = setInterval(tick, 1000);
  }
}

function showAuth(required) {
  $("auth").hidden = !required;
  if (required) $("api-key").value = api.apiKey();
}

async function loadInfo() {
  try {
    const info = await api.info();
    buildForm(info);
    $("model").textContent = `${info.name} · ${info.device} · ${info.precision} · v${info.version}`;
    // A key that works stays editable; without keys the field would only confuse.
    showAuth(Boolean(api.apiKey()));
    banner("");
    ready = true;
    // A job still going from before a reload is followed again.
    const docs = await gallery.render(reuse);
    const live = docs.find((d) => d.status === "queued" || d.status === "running");
    if (live) follow(live, () => gallery.render(reuse));
  } catch (e) {
    if (e.status === 401) {
      showAuth(true);
      banner(api.apiKey() ? "That API key was refused." : "This server requires an API key.");
      return;
    }
    const secs = e.retryAfter ?? 3;
    banner(`${e.status ? e.message : "The server cannot be reached."} Retrying in ${secs} s…`);
    setTimeout(loadInfo, secs * 1000);
  }
}

function reuse(settings) {
  fillForm(settings);
  clearError();
  window.scrollTo({ top: 0, behavior: "smooth" });
  $("prompt").focus();
}

async function generate() {
  if (!ready) return;
  clearError();
  const body = readBody();
  const button = $("generate");
  button.disabled = true;
  try {
    const doc = await api.submit(body);
    gallery.remember(doc.id);
    gallery.render(reuse);
    follow(doc, () => gallery.render(reuse));
  } catch (e) {
    showError(e, generate);
  } finally {
    button.disabled = false;
  }
}

function wire() {
  $("form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    generate();
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
      ev.preventDefault();
      generate();
    }
  });
  $("dice").addEventListener("click", randomSeed);
  $("cancel").addEventListener("click", cancelCurrent);
  $("api-key-save").addEventListener("click", () => {
    api.setApiKey($("api-key").value.trim());
    clearError();
    loadInfo();
  });
  $("gallery-clear").addEventListener("click", () => {
    gallery.forgetAll();
    gallery.render(reuse);
  });
}

wire();
loadInfo();
