// The generation form: built from `/info` (sizes, samplers, each stage's
// defaults and limits), read into a `POST /generate` body, filled back from a
// job's resolved settings ("reuse these settings"), and marked where the
// server's error names a field.

const $ = (id) => document.getElementById(id);

let stages = [];

function option(value, text, selected) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = text;
  o.selected = selected;
  return o;
}

function input(attrs) {
  const el = document.createElement("input");
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}

function labelled(text, control, stage, name) {
  const wrap = document.createElement("div");
  wrap.className = "field";
  control.id = `stage-${stage}-${name}`;
  control.name = name;
  const label = document.createElement("label");
  label.htmlFor = control.id;
  label.textContent = text;
  const err = document.createElement("p");
  err.className = "field-error";
  err.dataset.for = control.id;
  wrap.append(label, control, err);
  return wrap;
}

function stageRow(stage, limits) {
  const d = stage.defaults;
  const row = document.createElement("div");
  row.className = "stage";
  row.dataset.stage = stage.index;
  const title = document.createElement("h3");
  title.textContent = `${stage.index + 1}. ${stage.name} · ${stage.size}`;
  const sampler = document.createElement("select");
  for (const s of limits.samplers) sampler.append(option(s, s, s === d.sampler));
  const steps = input({ type: "number", min: 1, max: stage.max_steps, step: 1, value: d.steps, inputmode: "numeric" });
  const guidance = input({ type: "number", min: 0, max: limits.max_guidance_scale, step: 0.5, value: d.guidance_scale, inputmode: "decimal" });
  const grid = document.createElement("div");
  grid.className = "grid";
  grid.append(labelled("Sampler", sampler, stage.index, "sampler"), labelled("Steps", steps, stage.index, "steps"), labelled("Guidance", guidance, stage.index, "guidance_scale"));
  const range = document.createElement("p");
  range.className = "hint";
  range.textContent = `steps 1–${stage.max_steps} · guidance 0–${limits.max_guidance_scale}`;
  row.append(title, grid, range);
  return row;
}

/** How many stages the chosen size runs. */
export function stageCount() {
  const i = stages.findIndex((s) => s.size === $("size").value);
  return i < 0 ? stages.length : i + 1;
}

// Stages past the chosen size do not run: shown dimmed, their inputs off.
function syncStages() {
  const count = stageCount();
  for (const row of document.querySelectorAll(".stage")) {
    const off = Number(row.dataset.stage) >= count;
    row.classList.toggle("off", off);
    for (const el of row.querySelectorAll("input, select")) el.disabled = off;
  }
}

export function buildForm(info) {
  stages = info.stages;
  const limits = info.limits;
  $("n").max = limits.max_images;
  $("prompt").maxLength = limits.max_prompt_chars;
  $("negative_prompt").maxLength = limits.max_prompt_chars;
  const size = $("size");
  size.replaceChildren(
    ...stages.map((s, i) => option(s.size, `${s.size} (${i + 1} stage${i ? "s" : ""})`, i === stages.length - 1)),
  );
  const fieldset = $("stages");
  fieldset.querySelectorAll(".stage").forEach((r) => r.remove());
  for (const s of stages) fieldset.append(stageRow(s, limits));
  size.addEventListener("change", syncStages);
  syncStages();
}

// A u64 seed beyond 2^53 must reach the server digit for digit.
function seedJson(text) {
  if (!/^\d+$/.test(text)) return text === "" ? undefined : Number(text);
  return typeof JSON.rawJSON === "function" ? JSON.rawJSON(text) : Number(text);
}

const number = (el) => (el.value === "" ? undefined : Number(el.value));

/** The request body for what the form says; unset fields take the server's defaults. */
export function readBody() {
  const body = { prompt: $("prompt").value };
  const negative = $("negative_prompt").value;
  if (negative.trim()) body.negative_prompt = negative;
  body.n = number($("n"));
  body.seed = seedJson($("seed").value.trim());
  body.size = $("size").value;
  const count = stageCount();
  const overrides = [];
  for (let i = 0; i < count; i++) {
    const s = { sampler: $(`stage-${i}-sampler`).value, steps: number($(`stage-${i}-steps`)), guidance_scale: number($(`stage-${i}-guidance_scale`)) };
    if (i === 0) Object.assign(body, s);
    else overrides.push({ stage: i, ...s });
  }
  if (overrides.length) body.stage_overrides = overrides;
  return body;
}

/** Fills the form with a job's resolved settings (`request` of a job document). */
export function fillForm(settings) {
  $("prompt").value = settings.prompt;
  $("negative_prompt").value = settings.negative_prompt || "";
  $("n").value = settings.n;
  $("seed").value = String(settings.seed);
  const last = settings.stages.length - 1;
  if (stages[last]) $("size").value = stages[last].size;
  syncStages();
  for (const s of settings.stages) {
    if (!$(`stage-${s.index}-steps`)) continue;
    $(`stage-${s.index}-sampler`).value = s.sampler;
    $(`stage-${s.index}-steps`).value = s.steps;
    $(`stage-${s.index}-guidance_scale`).value = s.guidance_scale;
  }
}

export function randomSeed() {
  const words = crypto.getRandomValues(new Uint32Array(1));
  $("seed").value = String(words[0]);
}

// The input a server `param` names: top-level fields by id, the base stage's
// by bare name, other stages as `stages[i].x` (or the i-th `stage_overrides`
// entry, which readBody writes for stage i + 1).
function fieldFor(param) {
  if (!param) return null;
  if (["steps", "guidance_scale", "sampler"].includes(param)) return $(`stage-0-${param}`);
  if (param === "stages") return $("size");
  let m = /^stages\[(\d+)\]\.(\w+)$/.exec(param);
  if (m) return $(`stage-${m[1]}-${m[2]}`);
  m = /^stage_overrides\[(\d+)\]\.(\w+)$/.exec(param);
  if (m) return $(`stage-${Number(m[1]) + 1}-${m[2]}`);
  return $(param);
}

/** Marks the field `param` names with `message`; whether one was found. */
export function markField(param, message) {
  const el = fieldFor(param);
  if (!el) return false;
  el.setAttribute("aria-invalid", "true");
  // The box under the form has the whole message; next to the field, what is wrong with it.
  const note = document.querySelector(`.field-error[data-for="${el.id}"]`);
  if (note) note.textContent = message.replace(/^invalid `[^`]*`: /, "");
  el.focus();
  return true;
}

export function clearFieldErrors() {
  for (const el of document.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
  for (const el of document.querySelectorAll(".field-error")) el.textContent = "";
}
