#!/usr/bin/env node
/*
 * Point the plugin at your server: UXP only lets a plugin open sockets to the domains its manifest lists.
 *   node configure.js ws://192.168.1.20:7862 [manifest.json]
 * adds the server (ws:// or wss://) to requiredPermissions.network.domains and makes it the panel's default.
 */
"use strict";
const fs = require("fs");
const path = require("path");

function configure(server, manifestPath) {
  const url = new URL(server);
  if (!["ws:", "wss:"].includes(url.protocol)) throw new Error("the server must be a ws:// or wss:// URL");
  const origin = `${url.protocol}//${url.host}`;
  const manifest = JSON.parse(fs.readFileSync(manifestPath, "utf8"));
  const domains = manifest.requiredPermissions.network.domains;
  if (!domains.includes(origin)) domains.push(origin);
  fs.writeFileSync(manifestPath, JSON.stringify(manifest, null, 2) + "\n");
  fs.writeFileSync(path.join(path.dirname(manifestPath), "js", "default-server.js"),
    `"use strict";\nmodule.exports = ${JSON.stringify(origin)};\n`);
  return origin;
}

if (require.main === module) {
  const [server, manifest] = process.argv.slice(2);
  if (!server) { console.error("usage: node configure.js ws://HOST:PORT [manifest.json]"); process.exit(2); }
  console.log("added", configure(server, manifest || path.join(__dirname, "manifest.json")));
}
module.exports = { configure };
