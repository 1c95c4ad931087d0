#!/usr/bin/env node
/*
 * Drives bridge-client.js against a real sdcore bridge server, as the Photoshop panel would, and prints one
 * JSON line with what it saw (tests/test_bridge_photoshop.py checks it). Usage:
 *   node --experimental-websocket test/scenario.js ws://127.0.0.1:PORT TOKEN
 */
"use strict";
const { BridgeClient, BridgeError } = require("../js/bridge-client.js");
const { encodePNG } = require("../js/png.js");

const [url, token] = process.argv.slice(2);
const REQ = { prompt: "a red circle", steps: 2, width: 64, height: 64, sampler: "Euler" };
const b64 = (bytes) => Buffer.from(bytes).toString("base64");

async function refused(options) {
  try {
    await new BridgeClient(Object.assign({ url, reconnect: false }, options)).connect();
    return "accepted";
  } catch (e) {
    return e.code;
  }
}

async function main() {
  const out = {};
  out.no_token = await refused({});
  out.wrong_token = await refused({ token: "wrong" });
  out.incompatible = await refused({ token, protocolVersions: [99] });

  const client = new BridgeClient({ url, token, clientName: "photoshop-test", pingIntervalMs: 200 });
  const welcome = await client.connect();
  out.welcome = { protocol: welcome.protocol, methods: welcome.capabilities.methods, resumed: welcome.resumed };
  out.models = (await client.listModels()).map((m) => m.name);
  out.samplers = (await client.listSamplers()).length;
  out.loras = await client.listLoras();
  out.schema_has_mask = "mask" in (await client.getSchema()).properties;

  // txt2img
  const job = await client.submit(Object.assign({}, REQ, { seed: 5 }));
  const types = [];
  job.onEvent = (e) => types.push(e.type);
  const result = await job.result(120000);
  out.txt2img = { types: ["queued"].concat(types.filter((t) => t !== "queued")), seed: result.images[0].seed,
                  infotext: result.images[0].infotext, png: b64(result.images[0].data) };

  // inpaint: the document (the txt2img result) with a selection mask made by png.js
  const mask = new Uint8Array(64 * 64);
  for (let y = 16; y < 48; y++) for (let x = 16; x < 48; x++) mask[y * 64 + x] = 255;
  const inpaint = await client.submit(Object.assign({}, REQ, { seed: 6, mask_blur: 0 }),
                                      { init_image: result.images[0].data, mask: encodePNG(64, 64, mask, 1) });
  const painted = await inpaint.result(120000);
  out.inpaint = { mode: painted.data.request.mode, png: b64(painted.images[0].data) };

  // cancel a running and a queued job
  const long = await client.submit(Object.assign({}, REQ, { steps: 60, seed: 1 }));
  const queued = await client.submit(Object.assign({}, REQ, { seed: 2 }));
  await new Promise((resolve) => { long.onEvent = (e) => { if (e.type === "progress") resolve(); }; });
  const cq = await client.cancel(queued.id);
  const cr = await client.cancel(long.id);
  out.cancel = { queued: [cq.state, (await queued.wait(120000)).type], running: [cr.state, (await long.wait(120000)).type] };
  try { await client.cancel("f".repeat(32)); out.cancel.unknown = "accepted"; } catch (e) { out.cancel.unknown = e.code; }
  try { await client.submit({ steps: 0 }); out.bad_request = "accepted"; } catch (e) { out.bad_request = e.code; }

  // replace a queued job (live painting)
  const blocker = await client.submit(Object.assign({}, REQ, { steps: 8, seed: 3 }));
  const stale = await client.submit(Object.assign({}, REQ, { seed: 4 }));
  const fresh = await client.replace(stale.id, Object.assign({}, REQ, { seed: 44 }));
  out.replace = { stale: (await stale.wait(120000)).data.replaced_by === fresh.id, seed: (await fresh.result(120000)).images[0].seed };
  await blocker.wait(120000);

  // drop the connection mid-job: the client resumes and still gets the result, once
  const resumed = await client.submit(Object.assign({}, REQ, { steps: 8, seed: 7 }));
  await new Promise((resolve) => { resumed.onEvent = (e) => { if (e.type === "progress") resolve(); }; });
  client.dropConnection();
  const late = await resumed.result(120000);
  out.resume = { reconnects: client.reconnects, seed: late.images[0].seed,
                 results: resumed.history.filter((e) => e.type === "result").length, duplicates: client.duplicates };
  await client.close(true);
  process.stdout.write(JSON.stringify(out) + "\n");
}

main().then(() => process.exit(0), (e) => { console.error(e && e.stack || e); process.exit(1); });
