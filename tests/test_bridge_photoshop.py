"""The Photoshop UXP plugin: its manifest, and its JavaScript protocol client run under Node against the real
server (Photoshop itself cannot run here; the panel's Photoshop glue in js/panel.js is not exercised)."""

import base64
import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sdcore_bridges.testing import serve_in_thread, shared_engine

from sdcore.infotext import read_infotext

PLUGIN = Path(__file__).parents[1] / "bridges" / "photoshop"
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="Node.js is not installed")


def node_args():
    version = subprocess.run([NODE, "--version"], capture_output=True, text=True).stdout.strip()
    major = int(version.lstrip("v").split(".")[0])
    if major < 20:
        pytest.skip(f"Node {version} has no WebSocket; need >= 20")
    return [NODE] + (["--experimental-websocket"] if major < 22 else [])


def test_manifest_v5_with_network_permission():
    manifest = json.loads((PLUGIN / "manifest.json").read_text())
    assert manifest["manifestVersion"] == 5 and manifest["host"]["app"] == "PS"
    assert manifest["entrypoints"][0]["type"] == "panel" and (PLUGIN / manifest["main"]).is_file()
    assert "ws://127.0.0.1:7862" in manifest["requiredPermissions"]["network"]["domains"]


def test_configure_adds_the_server_to_the_manifest(tmp_path):
    copy = tmp_path / "plugin"
    shutil.copytree(PLUGIN, copy, ignore=shutil.ignore_patterns("node_modules"))
    out = subprocess.run(node_args() + [str(copy / "configure.js"), "wss://gpu.example:9000/"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    manifest = json.loads((copy / "manifest.json").read_text())
    assert "wss://gpu.example:9000" in manifest["requiredPermissions"]["network"]["domains"]
    assert "wss://gpu.example:9000" in (copy / "js" / "default-server.js").read_text()


def test_js_client_against_the_real_server(tiny_sd1_model):
    engine = shared_engine(str(tiny_sd1_model))
    with serve_in_thread(engine, token="ps-token") as server:
        proc = subprocess.run(node_args() + [str(PLUGIN / "test" / "scenario.js"), server.url, "ps-token"],
                              capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["no_token"] == out["wrong_token"] == "unauthorized"
    assert out["incompatible"] == "incompatible_protocol"
    assert out["welcome"]["protocol"] == 1 and "replace" in out["welcome"]["methods"]
    assert out["models"] == ["tiny-sd15"] and out["samplers"] > 5 and out["loras"] == []
    assert out["schema_has_mask"]
    t2i = out["txt2img"]
    assert t2i["types"] == ["queued", "started", "progress", "progress", "result"] and t2i["seed"] == 5
    png = base64.b64decode(t2i["png"])
    assert read_infotext(png) == t2i["infotext"]
    init = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    painted = np.asarray(Image.open(io.BytesIO(base64.b64decode(out["inpaint"]["png"]))).convert("RGB")).astype(int)
    assert out["inpaint"]["mode"] == "inpaint"
    keep = np.ones((64, 64), bool)
    keep[16:48, 16:48] = False
    assert np.array_equal(painted[keep], init[keep])  # the mask made by png.js: outside it nothing changed
    assert out["cancel"] == {"queued": ["queued", "cancelled"], "running": ["running", "cancelled"],
                             "unknown": "unknown_job"}
    assert out["bad_request"] == "invalid_request"
    assert out["replace"] == {"stale": True, "seed": 44}
    assert out["resume"]["reconnects"] >= 1 and out["resume"]["results"] == 1 and out["resume"]["seed"] == 7
