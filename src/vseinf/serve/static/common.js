// Shared by the pages: the header's line about the gallery being served.
"use strict";

async function loadGalleryInfo() {
  const info = await (await fetch("/api/info")).json();
  const what = info.kind === "videos" ? "video clips" : info.kind;
  document.getElementById("info").textContent = info.size + " " + what + " · " + info.engine + " search";
  return info;
}
