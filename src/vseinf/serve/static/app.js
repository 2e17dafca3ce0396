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
      fig.appendChild(clipPicture(r));
      cap.append(score, document.createTextNode(r.path));
    } else if (galleryKind === "images") {
      const img = document.createElement("img");
      img.src = thumbUrl(r.path);
      img.alt = r.path;
      img.title = r.path;
      fig.appendChild(img);
      cap.append(score, document.createTextNode(r.path));
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

async function searchText(event) {
  event.preventDefault();
  const q = $("q").value;
  const k = $("k").value;
  setStatus("searching…");
  $("query-preview").replaceChildren();
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

async function loadInfo() {
  try {
    const info = await (await fetch("/api/info")).json();
    galleryKind = info.kind;
    const what = info.kind === "videos" ? "video clips" : info.kind;
    $("info").textContent = info.size + " " + what + " · " + info.engine + " search";
    if (info.kind === "captions") $("q").placeholder = "find captions like…";
    if (info.kind === "videos") $("q").placeholder = "a person rides a bike";
    if (info.image_queries === false) $("image-form").hidden = true;  // the model cannot embed images here
  } catch (e) {
    setStatus("Cannot reach the server: " + e, true);
  }
}

$("text-form").addEventListener("submit", searchText);
$("file").addEventListener("change", searchImage);
loadInfo();
