// The search page: text queries and image uploads → a grid of results. Plain DOM, no libraries.
"use strict";

const $ = (id) => document.getElementById(id);
let galleryKind = "images";

function setStatus(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.className = isError ? "error" : "";
}

function thumbUrl(path) {
  return "/api/thumb?path=" + encodeURIComponent(path);
}

// A picture that opens the original file (served by /api/file) in a new tab, when there is one.
function linked(picture, r) {
  if (!r.file) return picture;
  const a = document.createElement("a");
  a.href = r.file;
  a.target = "_blank";
  a.rel = "noopener";
  a.appendChild(picture);
  return a;
}

// The file name on one line: cut with an ellipsis when too long, never broken mid-name.
function nameLabel(text) {
  const span = document.createElement("span");
  span.className = "name";
  span.textContent = text;
  span.title = text;
  return span;
}

// A video clip: its stored middle-frame thumbnail, or (clips indexed from frame-feature files have
// none) a placeholder box with the clip id.
function clipPicture(r) {
  if (r.thumb) {
    const img = document.createElement("img");
    img.src = r.thumb;
    img.alt = r.id;
    img.title = r.path;
    return img;
  }
  const box = document.createElement("div");
  box.className = "placeholder";
  box.title = r.path;
  box.textContent = r.id;
  return box;
}

function render(results) {
  const box = $("results");
  box.replaceChildren();
  const visual = galleryKind === "images" || galleryKind === "videos";
  box.className = visual ? "grid" : "grid captions";
  for (const r of results) {
    const fig = document.createElement("figure");
    fig.className = visual ? "result" : "result caption-result";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = r.score.toFixed(3);
    const cap = document.createElement("figcaption");
    if (galleryKind === "videos") {
      fig.classList.add("clip");
      fig.appendChild(linked(clipPicture(r), r));
      cap.append(score, nameLabel(r.path));
    } else if (galleryKind === "images") {
      const img = document.createElement("img");
      img.src = thumbUrl(r.path);
      img.alt = r.path;
      img.title = r.path + " (click to open the photo)";
      fig.appendChild(linked(img, r));
      cap.append(score, nameLabel(r.path));
    } else {
      cap.append(score, document.createTextNode(r.caption + "  (" + r.path + ")"));
    }
    fig.appendChild(cap);
    box.appendChild(fig);
  }
}

async function show(response, label) {
  let data = null;
  try { data = await response.json(); } catch (e) { /* not JSON: fall through */ }
  if (!response.ok) {
    const detail = data && data.detail ? (typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail))
                                       : response.statusText;
    setStatus("Error " + response.status + ": " + detail, true);
    $("results").replaceChildren();
    return;
  }
  setStatus(data.results.length + " results for " + label);
  render(data.results);
}

// The query lives in the page's URL (?q=…&k=…): a search can be bookmarked, and Back goes to the
// previous one.
function urlFor(q, k) {
  return q ? "?" + new URLSearchParams({ q: q, k: k }).toString() : location.pathname;
}

function searchText(event) {
  event.preventDefault();
  const q = $("q").value.trim();
  const k = $("k").value;
  if (q && location.search !== urlFor(q, k)) history.pushState({ q: q, k: k }, "", urlFor(q, k));
  runText(q, k);
}

async function runText(q, k) {
  $("query-preview").replaceChildren();
  if (!q) {
    setStatus("Type a few words to search for, e.g. “a dog runs on the beach”, or choose a photo.");
    $("results").replaceChildren();
    return;
  }
  setStatus("searching…");
  try {
    const response = await fetch("/api/search?q=" + encodeURIComponent(q) + "&k=" + encodeURIComponent(k));
    await show(response, "“" + q + "”");
  } catch (e) {
    setStatus("The server did not answer: " + e, true);
  }
}

async function searchImage() {
  const file = $("file").files[0];
  if (!file) return;
  const form = new FormData();
  form.append("file", file);
  form.append("k", $("k").value);
  // The photo is the query now: the old words leave the box and the URL.
  $("q").value = "";
  if (location.search) history.pushState({ image: file.name }, "", location.pathname);
  setStatus("searching…");
  const preview = document.createElement("img");
  preview.src = URL.createObjectURL(file);
  preview.alt = file.name;
  $("query-preview").replaceChildren(preview);
  try {
    const response = await fetch("/api/search/image", { method: "POST", body: form });
    await show(response, file.name);
  } catch (e) {
    setStatus("The server did not answer: " + e, true);
  }
}

// The search the URL asks for (on opening a bookmark, and on Back/Forward).
function searchFromUrl() {
  const params = new URLSearchParams(location.search);
  const q = params.get("q") || "";
  if (params.get("k")) $("k").value = params.get("k");
  $("q").value = q;
  if (q) {
    runText(q.trim(), $("k").value);
  } else {
    setStatus("");
    $("results").replaceChildren();
    $("query-preview").replaceChildren();
  }
}

async function loadInfo() {
  try {
    const info = await loadGalleryInfo();
    galleryKind = info.kind;
    if (info.kind === "captions") $("q").placeholder = "find captions like…";
    if (info.kind === "videos") $("q").placeholder = "a person rides a bike";
    if (info.image_queries === false) $("image-form").hidden = true;  // the model cannot embed images here
  } catch (e) {
    setStatus("Cannot reach the server: " + e, true);
  }
}

$("text-form").addEventListener("submit", searchText);
$("file").addEventListener("change", searchImage);
window.addEventListener("popstate", searchFromUrl);
loadInfo().then(searchFromUrl);
