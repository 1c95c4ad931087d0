"""The Krita extension (bridges/krita) against the real bridge server.

Two tiers:
- its logic (canvas/selection capture, requests, layer insertion, cancel) with a stand-in document that
  implements only the Krita calls the extension makes, in this process;
- the same logic inside the real Krita (Debian's `kritarunner`, no window), when it is installed; the docker's
  widgets themselves are not driven (kritarunner has no main window).
"""

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sdcore_bridges.testing import gate_for, serve_in_thread, shared_engine

KRITA_DIR = Path(__file__).parents[1] / "bridges" / "krita"
sys.path.insert(0, str(KRITA_DIR))
from sdcore_krita import controller as kc  # noqa: E402
from sdcore_krita import images as kimages  # noqa: E402
from sdcore_krita.worker import BridgeWorker  # noqa: E402


class FakeSelection:
    def __init__(self, doc_w, doc_h, box):
        self.box = box
        self.mask = np.zeros((doc_h, doc_w), np.uint8)
        x, y, w, h = box
        self.mask[y:y + h, x:x + w] = 255

    def x(self):
        return self.box[0]

    def y(self):
        return self.box[1]

    def width(self):
        return self.box[2]

    def height(self):
        return self.box[3]

    def pixelData(self, x, y, w, h):  # noqa: N802
        return self.mask[y:y + h, x:x + w].tobytes()


class FakeNode:
    def __init__(self, doc, name, parent=None):
        self.doc, self._name, self.parent, self.children = doc, name, parent, []
        self.pixels = np.zeros((doc.h, doc.w, 4), np.uint8)  # BGRA

    def name(self):
        return self._name

    def parentNode(self):  # noqa: N802
        return self.parent

    def addChildNode(self, child, above):  # noqa: N802
        child.parent = self
        index = self.children.index(above) + 1 if above is not None else len(self.children)
        self.children.insert(index, child)
        return True

    def setPixelData(self, data, x, y, w, h):  # noqa: N802
        self.pixels[y:y + h, x:x + w] = np.frombuffer(bytes(data), np.uint8).reshape(h, w, 4)


class FakeDocument:
    """The Krita Document calls the extension makes, on numpy pixels (BGRA like Krita's RGBA/U8)."""

    def __init__(self, w, h, selection=None):
        self.w, self.h = w, h
        self.root = FakeNode(self, "root")
        self.background = FakeNode(self, "Background", self.root)
        self.root.children.append(self.background)
        rng = np.random.default_rng(3)
        self.background.pixels[..., :3] = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        self.background.pixels[..., 3] = 255
        self._selection = FakeSelection(w, h, selection) if selection else None
        self.refreshed = 0

    def width(self):
        return self.w

    def height(self):
        return self.h

    def selection(self):
        return self._selection

    def refreshProjection(self):  # noqa: N802
        self.refreshed += 1

    def pixelData(self, x, y, w, h):  # noqa: N802
        return self.background.pixels[y:y + h, x:x + w].tobytes()

    def activeNode(self):  # noqa: N802
        return self.background

    def rootNode(self):  # noqa: N802
        return self.root

    def createNode(self, name, kind):  # noqa: N802
        assert kind == "paintlayer"
        return FakeNode(self, name)


@pytest.fixture(scope="module")
def engine(tiny_sd1_model):
    return shared_engine(str(tiny_sd1_model))


@pytest.fixture(scope="module")
def server(engine):
    gate_for(engine).open()
    with serve_in_thread(engine, token="krita-token") as handle:
        yield handle


def drive(controller, until, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        controller.poll()
        if until():
            return
        time.sleep(0.02)
    raise AssertionError("timed out waiting for the controller")


@pytest.fixture
def controller(server):
    worker = BridgeWorker()
    log = {"status": [], "progress": [], "done": []}
    ctrl = kc.Controller(worker, status=log["status"].append, progress=log["progress"].append,
                         done=log["done"].append)
    ctrl.log = log
    ctrl.connect(server.url, "krita-token")
    drive(ctrl, lambda: ctrl.welcome is not None or any("Failed" in s for s in log["status"]))
    assert ctrl.welcome is not None, log["status"]
    yield ctrl
    worker.close()


def test_png_codec_matches_pillow():
    rng = np.random.default_rng(0)
    for mode, channels in (("RGBA", 4), ("RGB", 3), ("L", 1)):
        shape = (37, 29, channels) if channels > 1 else (37, 29)
        pixels = rng.integers(0, 255, shape, dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels, mode).save(buf, format="PNG", optimize=True)  # all filter types
        bgra, w, h = kimages.png_to_bgra(buf.getvalue())
        expected = np.asarray(Image.open(buf).convert("RGBA"))[..., [2, 1, 0, 3]]
        assert (w, h) == (29, 37) and np.array_equal(np.frombuffer(bgra, np.uint8).reshape(h, w, 4), expected)
    bgra = rng.integers(0, 255, (16, 24, 4), dtype=np.uint8)
    png = kimages.bgra_to_png(bgra.tobytes(), 24, 16)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), bgra[..., [2, 1, 0, 3]])


def test_regions_are_multiples_of_8_inside_the_document():
    assert kc._fit_span(0, 100, 100) == (0, 96)
    assert kc._fit_span(20, 30, 100) == (0, 64)
    assert kc._fit_span(60, 90, 100) == (36, 64)
    with pytest.raises(kc.KritaBridgeError):
        kc._fit_span(0, 40, 40)


def test_whole_canvas_img2img_inserts_a_layer_above_the_active_one(controller):
    doc = FakeDocument(100, 72)
    controller.generate(doc, {"prompt": "a cat", "steps": 2, "sampler": "Euler", "seed": 4,
                              "denoising_strength": 0.5}, use_selection=True)
    drive(controller, lambda: controller.log["done"])
    [nodes] = controller.log["done"]
    assert len(nodes) == 1 and nodes[0].name() == "sdcore img2img 4"
    assert doc.root.children == [doc.background, nodes[0]]
    layer = nodes[0].pixels
    assert layer[:72, :96, 3].min() == 255 and layer[:, 96:].max() == 0  # the 96x72 region, opaque
    assert controller.log["progress"][-1] == 1.0 and any("Queued" in s for s in controller.log["status"])
    assert doc.refreshed >= 2


def test_selection_becomes_the_inpaint_mask(controller):
    doc = FakeDocument(128, 96, selection=(50, 30, 20, 16))
    controller.generate(doc, {"prompt": "a hat", "steps": 2, "sampler": "Euler", "seed": 9, "mask_blur": 0},
                        use_selection=True)
    drive(controller, lambda: controller.log["done"])
    [nodes] = controller.log["done"]
    layer = nodes[0].pixels
    assert nodes[0].name() == "sdcore inpaint 9"
    alpha = layer[..., 3]
    selected = doc.selection().mask == 255
    assert alpha[selected].min() == 255 and alpha[~selected].max() == 0  # only the selection is covered
    # inside the selection the layer holds the result: the same seed and mask through the server directly
    assert not np.array_equal(layer[selected][:, :3], doc.background.pixels[selected][:, :3])


def test_cancel_from_the_docker(controller, engine):
    gate = gate_for(engine)
    gate.close()
    try:
        doc = FakeDocument(64, 64)
        controller.generate(doc, {"prompt": "gate krita", "steps": 2, "sampler": "Euler"}, txt2img=True)
        drive(controller, lambda: controller.current is not None)
        assert gate.wait_entered(30)
        controller.cancel()
        time.sleep(0.1)
        gate.open()
        drive(controller, lambda: controller.log["done"])
    finally:
        gate.open()
    assert controller.log["done"] == [[]] and controller.log["status"][-1] == "Cancelled."
    assert doc.root.children == [doc.background]


ENTRY = '''
import json, os, sys, time
from krita import Krita

def main(args):
    out = {"python": sys.version.split()[0]}
    try:
        app = Krita.instance()
        doc = app.createDocument(128, 96, "sdcore-test", "RGBA", "U8", "", 300.0)
        layer = doc.createNode("paint", "paintlayer")
        doc.rootNode().addChildNode(layer, None)
        from PyQt5.QtCore import QByteArray
        import random
        rnd = random.Random(1)
        layer.setPixelData(QByteArray(bytes(rnd.randrange(256) if i % 4 != 3 else 255
                                            for i in range(128 * 96 * 4))), 0, 0, 128, 96)
        doc.setActiveNode(layer)
        from krita import Selection
        sel = Selection()
        sel.select(40, 24, 24, 16, 255)
        doc.setSelection(sel)
        from sdcore_krita.docker import SdcoreDocker
        docker = SdcoreDocker()  # the real docker widget, driven as a user would (without a window)
        docker.server.setText(os.environ["SDCORE_URL"])
        docker.token.setText(os.environ["SDCORE_TOKEN"])
        docker.prompt.setPlainText("a hat")
        docker.steps.setValue(2)
        docker.seed.setValue(5)
        log = {"done": []}
        ctrl = docker.controller
        ctrl.done = lambda nodes: (log["done"].append(nodes), docker._done(nodes))
        docker.connect_server()
        deadline = time.time() + 60
        while ctrl.welcome is None and time.time() < deadline:
            docker._poll(); time.sleep(0.02)
        out["models_in_docker"] = docker.model.count()
        # kritarunner has no view, so activeDocument() is None: hand the document to the controller directly
        settings = {"prompt": docker.prompt.toPlainText(), "steps": docker.steps.value(), "seed": docker.seed.value(),
                    "sampler": "Euler", "mask_blur": 0}
        ctrl.generate(doc, settings, use_selection=docker.use_selection.isChecked())
        while not log["done"] and time.time() < deadline:
            docker._poll(); time.sleep(0.02)
        log["status"] = [docker.status.text()]
        out["progress"] = docker.progress.value()
        nodes = log["done"][0] if log["done"] else []
        out["status"] = log["status"]
        out["layers"] = [n.name() for n in doc.rootNode().childNodes()]
        if nodes:
            data = bytes(nodes[0].pixelData(0, 0, 128, 96))
            alpha = data[3::4]
            out["alpha_inside"] = min(alpha[y * 128 + x] for y in range(24, 40) for x in range(40, 64))
            out["alpha_outside"] = max(alpha[y * 128 + x] for y in range(96) for x in range(128)
                                       if not (24 <= y < 40 and 40 <= x < 64))
        ctrl.worker.close()
    except Exception:
        import traceback
        out["error"] = traceback.format_exc()
    with open(os.environ["SDCORE_RESULT"], "w") as f:
        json.dump(out, f)
    sys.stdout.flush()
    os._exit(0)
'''


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("kritarunner") is None, reason="Krita is not installed (apt-get install krita "
                    "python3-pyqt5)")
def test_inside_real_krita(server, tmp_path):
    sys.path.insert(0, str(KRITA_DIR))
    import install

    pykrita = tmp_path / "pykrita"
    install.install(pykrita)
    (tmp_path / "entry").mkdir()
    (tmp_path / "entry" / "sdcore_krita_entry.py").write_text(ENTRY)
    result = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdcore-tests" / "kritarunner-home"
    home.mkdir(parents=True, exist_ok=True)  # a warm Krita profile: the first run builds it (~10 s), later ones ~1 s
    env.update(HOME=str(home), QT_QPA_PLATFORM="offscreen",
               PYTHONPATH=f"{pykrita}:{tmp_path / 'entry'}", SDCORE_URL=server.url, SDCORE_TOKEN="krita-token",
               SDCORE_RESULT=str(result), XDG_RUNTIME_DIR=str(tmp_path))
    proc = subprocess.run(["timeout", "-k", "5", "150", "kritarunner", "-s", "sdcore_krita_entry", "-f", "main"],
                          env=env, capture_output=True, text=True, timeout=170)
    assert result.exists(), proc.stderr[-3000:]
    out = json.loads(result.read_text())
    assert "error" not in out, out["error"]
    assert out["python"].startswith("3.")
    layers = out["layers"]
    assert "sdcore inpaint 5" in layers and layers.index("sdcore inpaint 5") > layers.index("paint"), out
    assert out["alpha_inside"] == 255 and out["alpha_outside"] == 0
    assert out["status"][-1] == "Done: 1 layer(s)." and out["progress"] == 1000 and out["models_in_docker"] == 1
