/*
 * The Photoshop panel: connects to an sdcore bridge server with a token, sends the document (or the selection
 * as an inpaint mask) as PNG, shows progress, and places each result as a new layer over the region it was
 * made for. The protocol work is all in bridge-client.js (tested under Node against the real server); this
 * file is the Photoshop glue (UXP `photoshop` and `uxp` modules), which only runs inside Photoshop.
 */
"use strict";

const { BridgeClient } = require("./js/bridge-client.js");
const { encodePNG } = require("./js/png.js");
const DEFAULT_SERVER = require("./js/default-server.js");

const ps = require("photoshop");
const { app, core, imaging, action } = ps;
const uxp = require("uxp");

const $ = (id) => document.getElementById(id);
let client = null;
let currentJob = null;

function status(text) { $("status").textContent = text; }

function settings() {
  return {
    server: $("server").value.trim() || DEFAULT_SERVER,
    token: $("token").value || null,
  };
}

async function connect() {
  const { server, token } = settings();
  localStorage.setItem("sdcore.server", server);
  localStorage.setItem("sdcore.token", token || "");
  if (client) await client.close();
  client = new BridgeClient({ url: server, token, clientName: "sdcore-photoshop", previews: false,
                              onStatus: (s) => status(`Server: ${s}`) });
  try {
    await client.connect();
  } catch (e) {
    status(`Cannot connect: ${e.message}`);
    client = null;
    return;
  }
  const models = await client.listModels();
  $("model").innerHTML = models.map((m) => `<option value="${m.name}" ${m.default ? "selected" : ""}>${m.name}</option>`).join("");
  const samplers = await client.listSamplers();
  $("sampler").innerHTML = samplers.map((s) => `<option>${s.name}</option>`).join("");
  status(`Connected to ${server} (protocol ${client.welcome.protocol}).`);
}

/** Document composite (or the selection's bounding box of it) and the selection mask, as PNG bytes. */
async function readDocument(useSelection) {
  const doc = app.activeDocument;
  if (!doc) throw new Error("Open a document first.");
  let bounds = { left: 0, top: 0, right: doc.width, bottom: doc.height };
  let mask = null;
  await core.executeAsModal(async () => {
    if (useSelection) {
      const sel = await imaging.getSelection({ documentID: doc.id });
      if (sel && sel.imageData) {
        const b = sel.sourceBounds;
        bounds = { left: b.left, top: b.top, right: b.right, bottom: b.bottom };
        const bytes = await sel.imageData.getData({ chunky: true });
        mask = encodePNG(sel.imageData.width, sel.imageData.height, bytes, 1);
        sel.imageData.dispose();
      }
    }
    const pixels = await imaging.getPixels({ documentID: doc.id, sourceBounds: bounds, componentSize: 8 });
    const data = await pixels.imageData.getData({ chunky: true });
    bounds.png = encodePNG(pixels.imageData.width, pixels.imageData.height, data, pixels.imageData.components);
    pixels.imageData.dispose();
  }, { commandName: "sdcore: read document" });
  return { bounds, image: bounds.png, mask };
}

/** Write a PNG to a temporary file and place it as a new layer at `bounds`. */
async function placeResult(png, bounds, name) {
  const fs = uxp.storage.localFileSystem;
  const folder = await fs.getTemporaryFolder();
  const file = await folder.createFile(`sdcore-${Date.now()}.png`, { overwrite: true });
  await file.write(png.buffer, { format: uxp.storage.formats.binary });
  const token = fs.createSessionToken(file);
  await core.executeAsModal(async () => {
    await action.batchPlay([{ _obj: "placeEvent", null: { _path: token, _kind: "local" },
                              freeTransformCenterState: { _enum: "quadCenterState", _value: "QCSAverage" } }], {});
    const layer = app.activeDocument.activeLayers[0];
    layer.name = name;
    const lb = layer.bounds;
    await layer.translate(bounds.left - lb.left, bounds.top - lb.top);
    await layer.rasterize();
  }, { commandName: "sdcore: place result" });
}

async function generate() {
  if (!client || !client.connected) await connect();
  if (!client) return;
  const txt2img = $("txt2img").checked;
  const request = {
    prompt: $("prompt").value, negative_prompt: $("negative").value, steps: Number($("steps").value),
    sampler: $("sampler").value || "DPM++ 2M", seed: Number($("seed").value), model: $("model").value || null,
  };
  let bounds = { left: 0, top: 0 };
  const images = {};
  try {
    if (!txt2img) {
      const doc = await readDocument($("use-selection").checked);
      bounds = doc.bounds;
      images.init_image = doc.image;
      if (doc.mask) images.mask = doc.mask;
      request.denoising_strength = Number($("strength").value);
      request.width = Math.max(64, Math.round((bounds.right - bounds.left) / 8) * 8);
      request.height = Math.max(64, Math.round((bounds.bottom - bounds.top) / 8) * 8);
    }
    currentJob = await client.submit(request, images);
  } catch (e) {
    status(`Not sent: ${e.message}`);
    return;
  }
  $("cancel").disabled = false;
  currentJob.onEvent = (event) => {
    if (event.type === "progress") $("progress").value = event.data.fraction;
    if (event.type === "queued") status(`Queued (position ${event.data.position}).`);
    if (event.type === "started") status("Generating…");
  };
  try {
    const result = await currentJob.result();
    for (const image of result.images) await placeResult(image.data, bounds, `sdcore ${image.seed}`);
    status(`Done: ${result.images.length} layer(s).`);
  } catch (e) {
    status(e.code === "cancelled" ? "Cancelled." : `Failed: ${e.message}`);
  } finally {
    $("cancel").disabled = true;
    $("progress").value = 0;
    currentJob = null;
  }
}

$("server").value = localStorage.getItem("sdcore.server") || DEFAULT_SERVER;
$("token").value = localStorage.getItem("sdcore.token") || "";
$("connect").addEventListener("click", () => connect());
$("generate").addEventListener("click", () => generate());
$("cancel").addEventListener("click", () => currentJob && currentJob.cancel().catch((e) => status(e.message)));
