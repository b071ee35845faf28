// The facecal web page: upload → POST /v1/intensify?format=json → draw the three stages; with a
// classifier loaded, POST /v1/classify for the photo and (frame=crop) for the generated face.
"use strict";

let classifier = null;  // /v1/model's classifier info, or null

const $ = (id) => document.getElementById(id);
const status = (text, isError = false) => {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
};

async function loadModel() {
  try {
    const res = await fetch("/v1/model");
    const info = await res.json();
    if (!res.ok) throw new Error(info.detail || res.statusText);
    const name = info.name ? `${info.name} v${info.version}` + (info.alias ? ` @${info.alias}` : "")
                           : info.file;
    classifier = info.classifier || null;
    let text = `model ${name} · ${info.arch} ${info.input_size.join("×")} · ` +
      `${info.precision} on ${info.providers.join(", ")}`;
    if (classifier) {
      const cname = classifier.name ? `${classifier.name} v${classifier.version}` : classifier.file;
      text += ` · classifier ${cname} (${classifier.regime}, ${classifier.classes.length} classes)`;
      $("classifier-name").textContent = `by ${cname}`;
    }
    $("model-info").textContent = text;
    const select = $("emotion");
    select.innerHTML = "";
    for (const e of info.emotions) {
      const opt = document.createElement("option");
      opt.value = e; opt.textContent = e;
      select.appendChild(opt);
    }
    if (!info.emotions.length) status("This model carries no gold templates: intensify is unavailable.", true);
    if (info.emotions.includes("happy")) select.value = "happy";
  } catch (err) {
    $("model-info").textContent = `could not read /v1/model: ${err.message}`;
  }
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("image failed to load"));
    img.src = src;
  });
}

function drawPoints(ctx, points, scale, colour, radius) {
  ctx.fillStyle = colour;
  for (const [x, y] of points) {
    ctx.beginPath();
    ctx.arc((x + 0.5) * scale, (y + 0.5) * scale, radius, 0, 2 * Math.PI);
    ctx.fill();
  }
}

async function show(result) {
  const aligned = await loadImage("data:image/png;base64," + result.aligned);
  const scale = 256 / result.crop.size;
  for (const id of ["detected", "calibrated"]) {
    const ctx = $(id).getContext("2d");
    ctx.imageSmoothingEnabled = true;
    ctx.clearRect(0, 0, 256, 256);
    ctx.drawImage(aligned, 0, 0, 256, 256);
  }
  drawPoints($("detected").getContext("2d"), result.crop.detected, scale, "#e53935", 2.5);
  const cal = $("calibrated").getContext("2d");
  drawPoints(cal, result.crop.detected, scale, "rgba(229, 57, 53, 0.45)", 2);
  drawPoints(cal, result.crop.calibrated, scale, "#2e7d32", 2.5);
  $("landmark-image").src = "data:image/png;base64," + result.landmark_image;
  $("result-image").src = "data:image/png;base64," + result.image;
  $("results").hidden = false;
  const t = result.timings_ms;
  $("timings").textContent = `${result.emotion} at intensity ${result.intensity.toFixed(2)} · ` +
    `${result.faces} face(s) found · decode ${t.decode} ms, detect ${t.detect} ms, ` +
    `calibrate + render ${t.calibrate_render} ms`;
}

async function classify(blob, frame) {
  const body = new FormData();
  body.append("image", blob, frame === "crop" ? "generated.png" : "photo");
  body.append("frame", frame);
  const res = await fetch("/v1/classify", { method: "POST", body });
  const data = await res.json().catch(() => ({ detail: res.statusText }));
  if (!res.ok) {
    const detail = typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail);
    throw new Error(`${res.status}: ${detail}`);
  }
  return data;
}

function showEmotion(cardId, result) {
  const card = $(cardId);
  const verdict = card.querySelector(".verdict");
  const bars = card.querySelector(".bars");
  bars.innerHTML = "";
  if (result instanceof Error) {
    verdict.textContent = result.message;
    verdict.className = "verdict error";
    return;
  }
  verdict.className = "verdict";
  verdict.textContent = `${result.emotion} (${(100 * result.confidence).toFixed(1)} %)`;
  const entries = Object.entries(result.probabilities).sort((a, b) => b[1] - a[1]);
  for (const [name, p] of entries) {
    const row = document.createElement("div");
    row.className = "bar" + (name === result.emotion ? " top" : "");
    row.innerHTML = `<span class="name"></span><span class="track"><span class="fill"></span></span>` +
      `<span class="value"></span>`;
    row.querySelector(".name").textContent = name;
    row.querySelector(".fill").style.width = `${(100 * p).toFixed(1)}%`;
    row.querySelector(".value").textContent = `${(100 * p).toFixed(1)} %`;
    bars.appendChild(row);
  }
}

function pngBlob(b64) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type: "image/png" });
}

$("intensity").addEventListener("input", () => {
  $("intensity-value").textContent = Number($("intensity").value).toFixed(2);
});

// The uploaded photo itself, face warped at its own resolution (output=photo).
async function showPhoto(file) {
  const body = new FormData();
  body.append("image", file);
  body.append("emotion", $("emotion").value);
  body.append("intensity", $("intensity").value);
  body.append("output", "photo");
  const res = await fetch("/v1/intensify", { method: "POST", body });
  if (!res.ok) {
    const data = await res.json().catch(() => ({ detail: res.statusText }));
    throw new Error(`${res.status}: ${typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail)}`);
  }
  const img = $("photo-image");
  const url = URL.createObjectURL(await res.blob());
  await new Promise((resolve, reject) => {
    img.onload = resolve;
    img.onerror = () => reject(new Error("the warped photo could not be shown"));
    img.src = url;
  });
  $("photo-size").textContent = `${img.naturalWidth}×${img.naturalHeight}`;
  $("photo-result").hidden = false;
}

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const file = $("photo").files[0];
  if (!file) { status("Choose a photo first.", true); return; }
  const body = new FormData();
  body.append("image", file);
  body.append("emotion", $("emotion").value);
  body.append("intensity", $("intensity").value);
  $("go").disabled = true;
  status("Working…");
  // The photo's emotion does not wait for the generator (errors are shown in its card).
  const photoEmotion = classifier ? classify(file, "photo").catch((err) => err) : null;
  try {
    const res = await fetch("/v1/intensify?format=json", { method: "POST", body });
    const data = await res.json().catch(() => ({ detail: res.statusText }));
    if (!res.ok) {
      const detail = typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail);
      throw new Error(`${res.status}: ${detail}`);
    }
    await show(data);
    await showPhoto(file);
    if (classifier) {
      const generated = await classify(pngBlob(data.image), "crop").catch((err) => err);
      showEmotion("photo-emotion", await photoEmotion);
      showEmotion("generated-emotion", generated);
      $("recognised").hidden = false;
    }
    status("Done.");
  } catch (err) {
    status(err.message, true);
  } finally {
    $("go").disabled = false;
  }
});

loadModel();
