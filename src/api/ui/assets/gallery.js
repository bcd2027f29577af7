// The gallery: the jobs this browser started (their ids in localStorage,
// newest first), each read back from `GET /jobs/{id}` — images, the settings
// they were made with, downloads and "reuse these settings". Jobs the server
// no longer has (retention, another key) are forgotten.

import * as api from "./api.js";

const STORAGE = "diffusiond.jobs";
const KEEP = 60;
const $ = (id) => document.getElementById(id);

export function ids() {
  try {
    const list = JSON.parse(localStorage.getItem(STORAGE) || "[]");
    return Array.isArray(list) ? list.filter((x) => typeof x === "string") : [];
  } catch {
    return [];
  }
}

function save(list) {
  localStorage.setItem(STORAGE, JSON.stringify(list.slice(0, KEEP)));
}

export function remember(id) {
  save([id, ...ids().filter((x) => x !== id)]);
}

function forget(id) {
  save(ids().filter((x) => x !== id));
}

export function forgetAll() {
  save([]);
}

// Object URLs of images already fetched, by image URL (images never change).
const blobs = new Map();

async function blobUrl(url) {
  if (!blobs.has(url)) blobs.set(url, api.imageUrl(url).catch((e) => (blobs.delete(url), Promise.reject(e))));
  return blobs.get(url);
}

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function params(doc) {
  const r = doc.request;
  const dl = el("dl", "params");
  const add = (k, v) => dl.append(el("dt", "", k), el("dd", "", v));
  if (r.negative_prompt) add("negative", r.negative_prompt);
  add("seed", String(r.seed));
  add("images", String(r.n));
  for (const s of r.stages) add(s.name, `${s.sampler}, ${s.steps} steps, guidance ${s.guidance_scale}`);
  add("created", new Date(doc.created_at).toLocaleString());
  return dl;
}

function card(doc, onReuse, onChange) {
  const c = el("article", `card ${doc.status}`);
  c.dataset.job = doc.id;
  c.append(el("h3", "prompt", doc.request.prompt));
  const images = el("div", "images");
  for (const image of doc.images) {
    const fig = el("figure");
    const img = el("img");
    img.alt = `${doc.request.prompt} (seed ${image.seed})`;
    img.width = image.width;
    img.height = image.height;
    img.loading = "lazy";
    const link = el("a", "download", "Download");
    link.download = `diffusiond-${doc.id.slice(0, 8)}-${image.index}.png`;
    blobUrl(image.url).then(
      (url) => {
        img.src = url;
        link.href = url;
      },
      (e) => (img.alt = e.message),
    );
    const caption = el("figcaption", "", `seed ${image.seed} · `);
    caption.append(link);
    fig.append(img, caption);
    images.append(fig);
  }
  if (doc.status === "queued" || doc.status === "running") {
    images.append(el("p", "muted", "in progress…"));
  } else if (doc.status !== "succeeded") {
    const why = doc.error ? `: ${doc.error.message}` : "";
    images.append(el("p", "muted", `${doc.status}${why}`));
  }
  c.append(images, params(doc));
  const actions = el("div", "card-actions");
  const reuse = el("button", "reuse", "Reuse these settings");
  reuse.type = "button";
  reuse.addEventListener("click", () => onReuse(doc.request));
  const remove = el("button", "link", "Remove");
  remove.type = "button";
  remove.addEventListener("click", () => {
    forget(doc.id);
    c.remove();
    onChange();
  });
  actions.append(reuse, remove);
  c.append(actions);
  return c;
}

let rendering = 0;

/**
 * Redraws the gallery from the stored ids; `onReuse(settings)` fills the form.
 * Resolves to the job documents shown (none when a later redraw overtook this one).
 */
export async function render(onReuse) {
  const round = ++rendering;
  const list = ids();
  const grid = $("gallery");
  const empty = () => ($("gallery-empty").hidden = grid.children.length > 0);
  // Fetch all at once, place them in order.
  const docs = await Promise.all(
    list.map((id) =>
      api.job(id).catch((e) => {
        if (e.status === 404) forget(id);
        return e.status === 404 ? null : { failed: e, id };
      }),
    ),
  );
  if (round !== rendering) return [];
  grid.replaceChildren();
  for (const doc of docs) {
    if (!doc) continue;
    if (doc.failed) {
      const c = el("article", "card failed", `${doc.id.slice(0, 8)}: ${doc.failed.message}`);
      c.dataset.job = doc.id;
      grid.append(c);
    } else {
      grid.append(card(doc, onReuse, empty));
    }
  }
  empty();
  return docs.filter((d) => d && !d.failed);
}
