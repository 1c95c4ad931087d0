"""What the docker does, without widgets: read the canvas or selection, send the job, insert the results.

Runs in Qt's thread (it calls Krita's API); the network work happens in a `BridgeWorker`. `poll()` is called
from a QTimer (the docker) or a loop (tests) and handles the worker's events.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import images

try:
    from PyQt5.QtCore import QByteArray
except ImportError:  # pragma: no cover - outside Krita
    QByteArray = bytes  # type: ignore[assignment,misc]

MIN_SIDE = 64


class KritaBridgeError(Exception):
    pass


@dataclass
class Region:
    """The part of the document a job was made for, and where its results go."""

    x: int
    y: int
    width: int
    height: int
    mask: bytes | None = None  # 1 byte per pixel, 255 = selected (repainted), region-sized


@dataclass
class Pending:
    document: Any
    region: Region
    anchor: Any  # the node that was active: results go right above it
    name: str


def _fit_span(start: int, end: int, limit: int) -> tuple[int, int]:
    """A span covering [start, end) inside [0, limit) whose length is a multiple of 8 and at least 64."""
    length = max(MIN_SIDE, -(-(end - start) // 8) * 8)
    if length > limit:
        length = limit - limit % 8
        if length < MIN_SIDE:
            raise KritaBridgeError(f"The document must be at least {MIN_SIDE} pixels wide and high.")
    if length > end - start:  # grow around the span's centre
        start -= (length - (end - start)) // 2
    start = max(0, min(start, limit - length))
    return start, length


def capture(document: Any, use_selection: bool, padding: int = 32) -> tuple[Region, bytes, bytes | None]:
    """The region to send, its pixels as PNG, and (when a selection is used) the mask PNG."""
    doc_w, doc_h = document.width(), document.height()
    selection = document.selection() if use_selection else None
    if selection is not None and selection.width() > 0 and selection.height() > 0:
        sx, sy, sw, sh = selection.x(), selection.y(), selection.width(), selection.height()
        x, w = _fit_span(max(0, sx - padding), min(doc_w, sx + sw + padding), doc_w)
        y, h = _fit_span(max(0, sy - padding), min(doc_h, sy + sh + padding), doc_h)
        mask = bytes(selection.pixelData(x, y, w, h))
        if not any(mask):
            raise KritaBridgeError("The selection is empty.")
    else:
        x, w = _fit_span(0, doc_w, doc_w)
        y, h = _fit_span(0, doc_h, doc_h)
        mask = None
    document.refreshProjection()
    pixels = bytes(document.pixelData(x, y, w, h))
    init = images.bgra_to_png(pixels, w, h)
    return Region(x, y, w, h, mask), init, (images.gray_to_png(mask, w, h) if mask is not None else None)


def build_request(settings: dict[str, Any], region: Region, mode: str) -> dict[str, Any]:
    """A sdcore GenerationRequest for `region` from the docker's settings."""
    request: dict[str, Any] = {
        "prompt": settings.get("prompt", ""), "negative_prompt": settings.get("negative_prompt", ""),
        "steps": int(settings.get("steps", 20)), "cfg_scale": float(settings.get("cfg_scale", 7.0)),
        "seed": int(settings.get("seed", -1)), "width": region.width, "height": region.height,
    }
    for key in ("sampler", "model"):
        if settings.get(key):
            request[key] = settings[key]
    if mode != "txt2img":
        request["denoising_strength"] = float(settings.get("denoising_strength", 0.75))
    if mode == "inpaint":
        request["mask_blur"] = int(settings.get("mask_blur", 4))
    return request


def insert_layer(document: Any, png: bytes, region: Region, name: str, anchor: Any = None) -> Any:
    """Add the result as a new paint layer at the region's place, right above `anchor` (else on top). For an
    inpaint result the layer is transparent outside the selection, so the original stays underneath."""
    bgra, width, height = images.png_to_bgra(png)
    if (width, height) != (region.width, region.height):
        raise KritaBridgeError(f"The result is {width}x{height}, not {region.width}x{region.height}.")
    if region.mask is not None:
        data = bytearray(bgra)
        alpha = memoryview(data)[3::4]
        alpha[:] = bytes(min(a, m) for a, m in zip(bytes(alpha), region.mask, strict=True))
        bgra = bytes(data)
    node = document.createNode(name, "paintlayer")
    parent = anchor.parentNode() if anchor is not None and anchor.parentNode() is not None \
        else document.rootNode()
    parent.addChildNode(node, anchor if anchor is not None and anchor.parentNode() is not None else None)
    node.setPixelData(QByteArray(bgra), region.x, region.y, width, height)
    document.refreshProjection()
    return node


class Controller:
    """Generate / cancel / poll, with callbacks for the UI: status(text), progress(fraction), done(nodes)."""

    def __init__(self, worker: Any, *, status: Callable[[str], None] | None = None,
                 progress: Callable[[float], None] | None = None,
                 done: Callable[[list[Any]], None] | None = None) -> None:
        self.worker = worker
        self.status = status or (lambda text: None)
        self.progress = progress or (lambda fraction: None)
        self.done = done or (lambda nodes: None)
        self.pending: dict[int, Pending] = {}
        self.jobs: dict[str, Pending] = {}
        self.current: str | None = None
        self.models: list[dict[str, Any]] = []
        self.welcome: dict[str, Any] | None = None
        self._tags = 0

    def connect(self, url: str, token: str | None) -> None:
        self.worker.connect(url, token)

    def generate(self, document: Any, settings: dict[str, Any], *, use_selection: bool = True,
                 txt2img: bool = False) -> None:
        if document is None:
            raise KritaBridgeError("Open a document first.")
        region, init, mask = capture(document, use_selection and not txt2img)
        mode = "txt2img" if txt2img else "inpaint" if mask is not None else "img2img"
        request = build_request(settings, region, mode)
        images_in: dict[str, bytes] = {}
        if mode != "txt2img":
            images_in["init_image"] = init
        if mask is not None:
            images_in["mask"] = mask
        self._tags += 1
        self.pending[self._tags] = Pending(document, region, document.activeNode(), f"sdcore {mode}")
        self.worker.submit(request, images_in, tag=self._tags)
        self.status(f"Sending {mode} of {region.width}x{region.height} at ({region.x}, {region.y})…")
        self.progress(0.0)

    def cancel(self) -> None:
        if self.current is not None:
            self.worker.cancel(self.current)
            self.status("Cancelling…")

    def poll(self) -> int:
        """Handle the worker's events; returns how many were handled."""
        import queue

        handled = 0
        while True:
            try:
                event = self.worker.events.get_nowait()
            except queue.Empty:
                return handled
            handled += 1
            self._handle(event)

    def _handle(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "status":
            self.status(event[1])
        elif kind == "connected":
            self.welcome = event[1]
            self.models = list(event[1].get("models", []))
            self.status(f"Connected (protocol {event[1]['protocol']}, {event[1]['engine'].get('device')}).")
        elif kind == "job":
            job_id, tag = event[1], event[2]
            pending = self.pending.pop(tag, None)
            if pending is not None:
                self.jobs[job_id] = pending
            self.current = job_id
        elif kind == "event":
            _, job_id, etype, data = event
            if etype == "queued":
                self.status(f"Queued (position {data.get('position', 0)}).")
            elif etype == "started":
                self.status("Generating…")
            elif etype == "progress":
                self.progress(float(data.get("fraction", 0.0)))
            elif etype == "cancelled":
                self.jobs.pop(job_id, None)
                self._finish(job_id, "Cancelled.", [])
        elif kind == "result":
            _, job_id, results = event
            pending = self.jobs.pop(job_id, None)
            nodes = []
            if pending is not None:
                for png, seed, _infotext in results:
                    nodes.append(insert_layer(pending.document, png, pending.region, f"{pending.name} {seed}",
                                              pending.anchor))
            self._finish(job_id, f"Done: {len(nodes)} layer(s).", nodes)
        elif kind == "failed":
            _, job_id, message = event
            if job_id is not None:
                self.jobs.pop(job_id, None)
            else:
                self.pending.clear()
            self._finish(job_id, f"Failed: {message}", [])
        elif kind == "models":
            self.models = list(event[1])

    def _finish(self, job_id: str | None, text: str, nodes: list[Any]) -> None:
        if job_id is None or job_id == self.current:
            self.current = None
        self.progress(0.0 if not nodes else 1.0)
        self.status(text)
        self.done(nodes)
