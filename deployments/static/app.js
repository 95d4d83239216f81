// The search page: plain JS, no build step. It talks to the REST API beside it (same origin) and sends
// the API key typed into the header (kept in localStorage) as "Authorization: Bearer <key>".
// Server data is only ever put into the page with textContent / attributes, never as HTML.
"use strict";

const PREFIX = "api/v1/operators/image-search";
const KEY_STORE = "imageSearch.apiKey";
const LIBRARY_STORE = "imageSearch.library";
const OPS = ["=", "!=", ">", ">=", "<", "<=", "contains", "not contains", "in", "not in"];

// The API sits beside the page, also when the app is served under a route prefix (/shop/ -> /shop/api/...).
const pageDir = location.pathname.endsWith("/") ? location.pathname : location.pathname + "/";
const API_BASE = new URL(PREFIX, location.origin + pageDir).href;

const $ = (id) => document.getElementById(id);
const state = { libraries: [], loaded: false, lastQuery: null };

class ApiError extends Error {
  constructor(status, message, http) {
    super(`${status} (HTTP ${http}): ${message}`);
    this.status = status;
    this.http = http;
    this.apiMessage = message;
  }
}

// -- API -------------------------------------------------------------------------------------------

async function api(method, path, body) {
  const headers = {};
  const key = localStorage.getItem(KEY_STORE);
  if (key) headers["Authorization"] = "Bearer " + key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(API_BASE + path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    throw new ApiError("NETWORK_ERROR", `the service cannot be reached (${err.message})`, 0);
  }
  let env = null;
  try {
    env = await response.json();
  } catch (_) {
    env = null;
  }
  if (!env || typeof env !== "object" || !("status" in env)) {
    throw new ApiError("INVALID_RESPONSE", "the answer is not the API's JSON envelope", response.status);
  }
  if (env.status !== "SUCCESS" || !response.ok) {
    throw new ApiError(env.status, env.message || env.status, response.status);
  }
  return env.data;
}

// -- messages --------------------------------------------------------------------------------------

function showError(err) {
  const box = $("error");
  box.replaceChildren();
  const title = document.createElement("strong");
  title.className = "error-status";
  title.textContent = err instanceof ApiError ? err.status : "ERROR";
  const text = document.createElement("span");
  text.className = "error-message";
  text.textContent = err instanceof ApiError ? ` (HTTP ${err.http}): ${err.apiMessage}` : ": " + err.message;
  box.append(title, text);
  if (err instanceof ApiError && err.status === "UNAUTHORIZED") {
    const hint = document.createElement("div");
    hint.textContent = "Enter a valid API key in the header and press Save.";
    box.append(hint);
    $("api-key").focus();
  }
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").replaceChildren();
}

function setStatus(text) {
  $("status").textContent = text;
}

// -- libraries -------------------------------------------------------------------------------------

async function loadLibraries() {
  const select = $("library");
  try {
    const data = await api("GET", "/library/list");
    clearError();
    state.libraries = data.libraries;
    state.loaded = true;
  } catch (err) {
    state.libraries = [];
    state.loaded = false;
    select.replaceChildren();
    updateLibraryInfo();
    showError(err);
    return;
  }
  const wanted = select.value || localStorage.getItem(LIBRARY_STORE);
  select.replaceChildren();
  for (const lib of state.libraries) {
    const option = document.createElement("option");
    option.value = lib.library_name;
    option.textContent = lib.library_name;
    select.append(option);
  }
  if (state.libraries.some((lib) => lib.library_name === wanted)) select.value = wanted;
  updateLibraryInfo();
}

function currentLibrary() {
  return state.libraries.find((lib) => lib.library_name === $("library").value) || null;
}

function updateLibraryInfo() {
  const lib = currentLibrary();
  const info = $("library-info");
  const textOk = !lib || lib.mode === "general_search";
  $("query-text").disabled = !textOk;
  $("text-search").disabled = !textOk;
  $("query-text").placeholder = textOk
    ? "Search by text, e.g. a white T-shirt"
    : `text search needs a general_search library (this one is ${lib.mode})`;
  if (!lib) {
    info.textContent =
      state.loaded && !state.libraries.length ? "no libraries yet: create one (image-search library create NAME)" : "";
    return;
  }
  localStorage.setItem(LIBRARY_STORE, lib.library_name);
  info.textContent = `${lib.mode} · ${lib.image_count} image${lib.image_count === 1 ? "" : "s"} · ${lib.model.name}`;
}

// -- tag filter editor -----------------------------------------------------------------------------

function addFilterRow(values) {
  const row = $("filter-row").content.firstElementChild.cloneNode(true);
  if (values) {
    row.querySelector(".f-field").value = values.field || "";
    row.querySelector(".f-op").value = values.op || "=";
    row.querySelector(".f-type").value = values.type || "string";
    row.querySelector(".f-value").value = values.value || "";
  }
  row.querySelector(".f-remove").addEventListener("click", () => {
    row.remove();
    renderFilterJson();
  });
  row.addEventListener("input", renderFilterJson);
  row.addEventListener("change", renderFilterJson);
  $("filter-rows").append(row);
  renderFilterJson();
  return row;
}

function parseValue(text, type, where) {
  if (type === "number") {
    const n = Number(text.trim());
    if (text.trim() === "" || !Number.isFinite(n)) throw new Error(`${where}: '${text}' is not a number`);
    return n;
  }
  if (type === "boolean") {
    const t = text.trim().toLowerCase();
    if (t !== "true" && t !== "false") throw new Error(`${where}: a boolean is true or false, not '${text}'`);
    return t === "true";
  }
  return text;
}

// The tag_filter the rows describe: null (no rows), a list (all) or {"or": [...]} (any).
function buildFilter() {
  const conditions = [];
  $("filter-rows").querySelectorAll(".filter-row").forEach((row, i) => {
    const field = row.querySelector(".f-field").value.trim();
    const op = row.querySelector(".f-op").value;
    const type = row.querySelector(".f-type").value;
    const raw = row.querySelector(".f-value").value;
    if (!field && !raw) return; // a blank row is ignored
    const where = `condition ${i + 1}`;
    if (!field) throw new Error(`${where}: the tag name is empty`);
    if (!OPS.includes(op)) throw new Error(`${where}: unknown operator ${op}`);
    let value;
    if (op === "in" || op === "not in") {
      const parts = raw.split(",").map((s) => s.trim()).filter((s) => s !== "");
      value = parts.map((p) => parseValue(p, type, where));
    } else {
      value = parseValue(type === "string" ? raw : raw.trim(), type, where);
    }
    conditions.push({ field, op, value });
  });
  if (!conditions.length) return null;
  return $("filter-combine").value === "or" ? { or: conditions } : conditions;
}

function renderFilterJson() {
  const out = $("filter-json");
  try {
    out.textContent = JSON.stringify(buildFilter(), null, 1);
    out.classList.remove("invalid");
  } catch (err) {
    out.textContent = err.message;
    out.classList.add("invalid");
  }
}

// -- search ----------------------------------------------------------------------------------------

function searchOptions() {
  const topK = parseInt($("top-k").value, 10);
  if (!Number.isInteger(topK) || topK < 1 || topK > 1000) throw new Error("top k must be between 1 and 1000");
  const options = { top_k: topK, return_frame: true };
  const minScore = $("min-score").value.trim();
  if (minScore !== "") {
    const m = Number(minScore);
    if (!Number.isFinite(m) || m < 0 || m > 1) throw new Error("min score must be between 0 and 1");
    options.min_score = m;
  }
  const filter = buildFilter();
  if (filter !== null) options.tag_filter = filter;
  return options;
}

async function runSearch(query) {
  const lib = currentLibrary();
  if (!lib) {
    showError(new Error("choose a library first"));
    return;
  }
  let body;
  try {
    body = { library_name: lib.library_name, ...query.body, ...searchOptions() };
  } catch (err) {
    showError(err);
    return;
  }
  state.lastQuery = query;
  showQueryImage(query.preview || null);
  document.body.classList.add("busy");
  setStatus(`Searching ${lib.library_name} ${query.label}…`);
  const started = performance.now();
  try {
    const data = await api("POST", query.path, body);
    clearError();
    renderResults(data.results);
    const ms = Math.round(performance.now() - started);
    const n = data.results.length;
    setStatus(`${n} result${n === 1 ? "" : "s"} ${query.label} in ${lib.library_name} (${ms} ms)`);
  } catch (err) {
    $("results").replaceChildren();
    setStatus("");
    showError(err);
  } finally {
    document.body.classList.remove("busy");
  }
}

function searchText() {
  const text = $("query-text").value;
  if (!text.trim()) return;
  runSearch({ path: "/search/by-text", body: { query_text: text }, label: `for “${text}”` });
}

function searchImageFile(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    const dataUrl = reader.result; // the service strips the data:image/...;base64, prefix
    runSearch({
      path: "/search/by-image",
      body: { image_base64: dataUrl },
      label: `like ${file.name}`,
      preview: dataUrl,
    });
  };
  reader.onerror = () => showError(new Error(`cannot read ${file.name}`));
  reader.readAsDataURL(file);
}

function searchById(imageId, imageUri, thumbnail) {
  runSearch({
    path: "/search/by-id",
    body: { image_id: imageId, image_uri: imageUri },
    label: `like ${imageId}`,
    preview: thumbnail,
  });
}

// The query image beside the drop zone: the uploaded file, the clicked result, or nothing (text).
function showQueryImage(src) {
  const preview = $("query-preview");
  if (src) preview.src = src;
  else preview.removeAttribute("src");
  preview.hidden = !src;
}

// -- results ---------------------------------------------------------------------------------------

// Browsers need a type in a data: URL; the stored bytes are the original upload, so sniff its magic.
function mimeOf(b64) {
  if (b64.startsWith("/9j/")) return "image/jpeg";
  if (b64.startsWith("iVBORw0KGgo")) return "image/png";
  if (b64.startsWith("R0lGOD")) return "image/gif";
  if (b64.startsWith("UklGR")) return "image/webp";
  if (b64.startsWith("Qk")) return "image/bmp";
  if (b64.startsWith("SUkq") || b64.startsWith("TU0AK")) return "image/tiff";
  return "application/octet-stream";
}

function isWebUrl(text) {
  try {
    const u = new URL(text);
    return u.protocol === "http:" || u.protocol === "https:";
  } catch (_) {
    return false;
  }
}

function renderResults(results) {
  const grid = $("results");
  grid.replaceChildren();
  for (const r of results) grid.append(resultCard(r));
}

function resultCard(r) {
  const card = document.createElement("figure");
  card.className = "result";
  card.tabIndex = 0;
  card.dataset.imageId = r.image_id;
  card.dataset.imageUri = r.image_uri;
  card.title = `Search for images like ${r.image_id}`;

  const src = r.image_base64 ? `data:${mimeOf(r.image_base64)};base64,${r.image_base64}` : null;
  if (src) {
    const img = document.createElement("img");
    img.className = "thumb";
    img.alt = r.image_id;
    img.src = src;
    card.append(img);
  } else {
    // No stored frame (save_image: false): show where the image lives instead.
    const box = document.createElement("div");
    box.className = "thumb no-frame";
    if (isWebUrl(r.image_uri)) {
      const a = document.createElement("a");
      a.href = r.image_uri;
      a.target = "_blank";
      a.rel = "noopener noreferrer";
      a.textContent = r.image_uri;
      a.addEventListener("click", (e) => e.stopPropagation());
      box.append(a);
    } else {
      box.textContent = r.image_uri;
    }
    card.append(box);
  }

  const caption = document.createElement("figcaption");
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = r.score.toFixed(3);
  const id = document.createElement("span");
  id.className = "image-id";
  id.textContent = r.image_id;
  caption.append(score, id);
  const tags = document.createElement("ul");
  tags.className = "tags";
  for (const [k, v] of Object.entries(r.tags)) {
    const li = document.createElement("li");
    li.textContent = `${k}: ${Array.isArray(v) ? v.join(", ") : String(v)}`;
    tags.append(li);
  }
  caption.append(tags);
  card.append(caption);

  card.addEventListener("click", () => searchById(r.image_id, r.image_uri, src));
  card.addEventListener("keydown", (e) => {
    if (e.key === "Enter") searchById(r.image_id, r.image_uri, src);
  });
  return card;
}

// -- wiring ----------------------------------------------------------------------------------------

function init() {
  $("api-key").value = localStorage.getItem(KEY_STORE) || "";
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("api-key").value.trim();
    if (key) localStorage.setItem(KEY_STORE, key);
    else localStorage.removeItem(KEY_STORE);
    loadLibraries();
  });
  $("refresh-libraries").addEventListener("click", loadLibraries);
  $("library").addEventListener("change", () => {
    updateLibraryInfo();
    $("results").replaceChildren();
    state.lastQuery = null;
    showQueryImage(null);
    setStatus("");
  });
  $("text-form").addEventListener("submit", (e) => {
    e.preventDefault();
    searchText();
  });
  $("image-file").addEventListener("change", (e) => {
    searchImageFile(e.target.files[0]);
    e.target.value = ""; // choosing the same file again searches again
  });
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    searchImageFile(e.dataTransfer.files[0]);
  });
  zone.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") $("image-file").click();
  });
  $("add-filter").addEventListener("click", () => addFilterRow().querySelector(".f-field").focus());
  $("filter-combine").addEventListener("change", renderFilterJson);
  $("apply-filter").addEventListener("click", () => {
    if (state.lastQuery) runSearch(state.lastQuery);
    else if ($("query-text").value.trim()) searchText();
  });
  renderFilterJson();
  loadLibraries();
}

document.addEventListener("DOMContentLoaded", init);
