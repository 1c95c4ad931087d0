"""An A1111-compatible HTTP API (`/sdapi/v1/...`) served from the bridge's process, loop and Engine.

The `websockets` library answers plain GET requests only (no request bodies), so this is a small asyncio
HTTP/1.1 server of its own (keep-alive, Content-Length and chunked bodies), on its own port (`--a1111-port`,
default 7860 like A1111). Jobs go through the bridge's fair queue like websocket jobs; each caller is one
queue owner, identified by its address and its Basic-auth user name (or `X-Sdcore-Client` header), and
`/interrupt` and `/progress` concern only that caller's jobs.

Field names, defaults and responses follow A1111 (research/a1111.md §10), so clients such as `webuiapi`
work unchanged. Not supported (refused with 422 rather than silently ignored): `enable_hr`, `script_name`.
Ignored because sdcore has no such feature: `restore_faces`, `tiling`, `styles`, `eta`, `s_*`, `resize_mode`,
`alwayson_scripts`, `save_images`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import inspect
import io
import json
import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from .protocol import ProtocolError

if TYPE_CHECKING:
    from .server import BridgeJob, BridgeServer

log = logging.getLogger("sdcore.bridge.a1111")

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 512 * 1024 * 1024
INPAINTING_FILL = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}
SCHEDULERS = {"automatic": "Automatic", "karras": "Karras", "exponential": "Exponential",
              "sgm_uniform": "SGM Uniform", "uniform": "Uniform", "polyexponential": "Polyexponential"}
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 411: "Length Required", 413: "Payload Too Large", 431: "Request Header Fields Too Large",
           422: "Unprocessable Entity", 429: "Too Many Requests", 500: "Internal Server Error"}


class HttpError(Exception):
    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


class _Caller:
    """What the A1111 API remembers per caller: its jobs (latest last) and its latest preview."""

    def __init__(self) -> None:
        self.jobs: list[BridgeJob] = []
        self.preview: bytes | None = None


class A1111Api:
    def __init__(self, server: BridgeServer) -> None:
        self.server = server
        self.model: str | None = None  # set by POST /options sd_model_checkpoint; None = engine default
        self.callers: dict[str, _Caller] = {}
        self._server: asyncio.Server | None = None
        self.port = 0
        self._conns: set[asyncio.Task[Any]] = set()

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._connection, host, port, limit=MAX_HEADER_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._conns):
                task.cancel()
            await self._server.wait_closed()

    # -- HTTP/1.1 -------------------------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        peer = writer.get_extra_info("peername")
        host = str(peer[0]) if peer else ""
        try:
            while True:
                try:
                    line = await reader.readline()
                except (asyncio.LimitOverrunError, ValueError):
                    await self._respond(writer, 400, {"error": "bad_request", "detail": "request line too long"},
                                        close=True)
                    return
                if not line:
                    return
                try:
                    method, target, version = line.decode("latin-1").strip().split(" ", 2)
                    headers = await self._headers(reader)
                    body = await self._body(reader, headers)
                except HttpError as exc:
                    await self._respond(writer, exc.status, {"error": exc.error, "detail": exc.detail}, close=True)
                    return
                except (ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    await self._respond(writer, 400, {"error": "bad_request", "detail": "malformed request"},
                                        close=True)
                    return
                keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
                try:
                    status, payload = await self._route(method, target, headers, body, host)
                except HttpError as exc:
                    status, payload = exc.status, {"error": exc.error, "detail": exc.detail}
                except Exception as exc:  # noqa: BLE001 - one failing request must not stop the server
                    log.exception("A1111 API request failed")
                    status, payload = 500, {"error": type(exc).__name__, "detail": str(exc)}
                await self._respond(writer, status, payload, close=not keep)
                if not keep:
                    return
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if task is not None:
                self._conns.discard(task)
            writer.close()

    async def _headers(self, reader: asyncio.StreamReader) -> dict[str, str]:
        headers: dict[str, str] = {}
        total = 0
        while True:
            line = await reader.readline()
            total += len(line)
            if total > MAX_HEADER_BYTES or len(headers) > 100:
                raise HttpError(431 if total > MAX_HEADER_BYTES else 400, "bad_request", "headers too large")
            if line in (b"\r\n", b"\n", b""):
                return headers
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()

    async def _body(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            parts, size = [], 0
            while True:
                line = await reader.readline()
                length = int(line.split(b";")[0].strip() or b"0", 16)
                if length == 0:
                    await reader.readline()
                    return b"".join(parts)
                size += length
                if size > MAX_BODY_BYTES:
                    raise HttpError(413, "too_large", f"bodies may be at most {MAX_BODY_BYTES} bytes")
                parts.append(await reader.readexactly(length))
                await reader.readline()
        length = int(headers.get("content-length", "0") or 0)
        if length < 0:
            raise HttpError(400, "bad_request", "negative Content-Length")
        if length > MAX_BODY_BYTES:
            raise HttpError(413, "too_large", f"bodies may be at most {MAX_BODY_BYTES} bytes")
        return await reader.readexactly(length) if length else b""

    async def _respond(self, writer: asyncio.StreamWriter, status: int, payload: Any, *, close: bool) -> None:
        if isinstance(payload, bytes):
            body = payload
        elif isinstance(payload, dict) and payload.get("images"):
            body = await asyncio.to_thread(_dumps, payload)  # megabytes of base64: keep the loop free
        else:
            body = _dumps(payload)
        head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nServer: sdcore-bridge\r\n"
                f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n")
        writer.write(head.encode("latin-1"))
        writer.write(body)
        await writer.drain()

    # -- auth and routing -----------------------------------------------------------------------------
    def _caller(self, headers: dict[str, str], host: str) -> str:
        server = self.server
        origin = headers.get("origin")
        if origin is not None and origin not in server.allowed_origins:
            raise HttpError(403, "forbidden", f"Origin {origin[:100]!r} is not allowed (--allow-origin).")
        user, secret = "", None
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer":
            secret = value.strip()
        elif scheme.lower() == "basic":
            try:
                user, _, secret = base64.b64decode(value.strip()).decode("utf-8").partition(":")
            except (binascii.Error, ValueError):
                raise HttpError(401, "unauthorized", "malformed Basic credentials") from None
        if server.token is not None:
            if secret is None or not hmac.compare_digest(secret.encode(), server.token.encode()):
                raise HttpError(401, "unauthorized", "Missing or wrong token: send it as a Bearer token or as "
                                "the Basic-auth password.")
        name = headers.get("x-sdcore-client") or user or "anonymous"
        return f"a1111:{host}:{name[:100]}"

    async def _route(self, method: str, target: str, headers: dict[str, str], body: bytes,
                     host: str) -> tuple[int, Any]:
        url = urlsplit(target)
        path = url.path.rstrip("/")
        owner = self._caller(headers, host)
        if not path.startswith("/sdapi/v1/"):
            raise HttpError(404, "not_found", f"{path} is not an endpoint of this server; see /sdapi/v1/.")
        name = path[len("/sdapi/v1/"):]
        routes = {
            ("POST", "txt2img"): self.txt2img, ("POST", "img2img"): self.img2img,
            ("GET", "progress"): self.progress, ("POST", "interrupt"): self.interrupt,
            ("GET", "sd-models"): self.sd_models, ("GET", "samplers"): self.samplers,
            ("GET", "schedulers"): self.schedulers, ("GET", "loras"): self.loras,
            ("GET", "embeddings"): self.embeddings, ("GET", "options"): self.get_options,
            ("POST", "options"): self.set_options, ("POST", "png-info"): self.png_info,
            ("GET", "scripts"): self.scripts, ("GET", "upscalers"): self.upscalers,
        }
        handler = routes.get((method.upper(), name))
        if handler is None:
            if any(n == name for _, n in routes):
                raise HttpError(405, "method_not_allowed", f"{method} is not allowed on {path}.")
            raise HttpError(404, "not_found", f"{path} is not an endpoint of this server.")
        params = {k: v[-1] for k, v in parse_qs(url.query).items()}
        data: Any = {}
        if method.upper() == "POST" and body:
            try:
                data = await asyncio.to_thread(json.loads, body)
            except ValueError as exc:
                raise HttpError(400, "bad_json", f"the body is not JSON: {exc}") from None
            if not isinstance(data, dict):
                raise HttpError(422, "invalid_request", "the body must be a JSON object")
        return 200, await handler(owner=owner, data=data, params=params)

    # -- generation -----------------------------------------------------------------------------------
    async def txt2img(self, owner: str, data: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        return await self._generate(owner, data, img2img=False)

    async def img2img(self, owner: str, data: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        return await self._generate(owner, data, img2img=True)

    def _request(self, data: dict[str, Any], img2img: bool) -> dict[str, Any]:
        if data.get("enable_hr"):
            raise HttpError(422, "not_supported", "enable_hr (hires fix) is not supported by this server.")
        if data.get("script_name"):
            raise HttpError(422, "not_supported", f"script {data['script_name']!r} is not available here.")
        req: dict[str, Any] = {}
        for key in ("prompt", "negative_prompt", "seed", "subseed", "subseed_strength", "steps", "cfg_scale",
                    "width", "height", "batch_size"):
            if data.get(key) is not None:
                req[key] = data[key]
        if data.get("n_iter") is not None:
            req["batch_count"] = data["n_iter"]
        sampler = data.get("sampler_name") or data.get("sampler_index")
        if sampler:
            req["sampler"] = sampler
        scheduler = data.get("scheduler")
        if isinstance(scheduler, str) and scheduler:
            req["schedule_type"] = SCHEDULERS.get(scheduler.lower(), scheduler)
        overrides = data.get("override_settings") or {}
        model = overrides.get("sd_model_checkpoint") if isinstance(overrides, dict) else None
        model = model or self.model
        if model:
            req["model"] = self._model_path(model)
        if isinstance(overrides, dict) and overrides.get("CLIP_stop_at_last_layers"):
            req["clip_skip"] = overrides["CLIP_stop_at_last_layers"]
        if img2img:
            images = data.get("init_images") or []
            if not images:
                raise HttpError(422, "invalid_request", "img2img needs init_images (a list of base64 images).")
            req["init_image"] = _b64_image(images[0], "init_images[0]")
            if data.get("denoising_strength") is not None:
                req["denoising_strength"] = data["denoising_strength"]
            if data.get("mask"):
                mask = _b64_image(data["mask"], "mask")
                if data.get("inpainting_mask_invert"):
                    mask = _invert(mask)
                req["mask"] = mask
                for key in ("mask_blur", "inpaint_full_res_padding"):
                    if data.get(key) is not None:
                        req[key] = data[key]
                if data.get("inpaint_full_res") is not None:
                    req["inpaint_full_res"] = bool(data["inpaint_full_res"])
                fill = data.get("inpainting_fill")
                if fill is not None:
                    if fill not in INPAINTING_FILL:
                        raise HttpError(422, "invalid_request", "inpainting_fill is 0 (fill), 1 (original), "
                                        "2 (latent noise) or 3 (latent nothing).")
                    req["masked_content"] = INPAINTING_FILL[fill]
        return req

    def _model_path(self, name: str) -> str:
        for entry in self.server.model_entries():
            if name in (entry["name"], entry["path"], _title(entry)):
                return str(entry["path"])
        raise HttpError(422, "invalid_request", f"Unknown model {name[:200]!r}; GET /sdapi/v1/sd-models lists them.")

    async def _generate(self, owner: str, data: dict[str, Any], img2img: bool) -> dict[str, Any]:
        raw = await asyncio.to_thread(self._request, data, img2img)
        try:
            summary = await self.server.validate_request(raw)
        except ProtocolError as exc:
            raise HttpError(422, exc.code, exc.message) from None
        caller = self.callers.setdefault(owner, _Caller())
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def watcher(job: BridgeJob, item: Any) -> None:
            if isinstance(item, tuple):
                caller.preview = item[1]
            elif item.terminal and not done.done():
                done.set_result(item)

        raw["preview_every"] = raw.get("preview_every") or 0
        job = self.server.submit_local(owner, raw, summary, watcher)
        caller.jobs = [j for j in caller.jobs if not j.done][-50:] + [job]
        item = await done
        parameters = {k: v for k, v in data.items() if k not in ("init_images", "mask")}
        if img2img:
            parameters["init_images"] = None
            parameters["mask"] = None
        if item.type == "result":
            return await asyncio.to_thread(self._response, item, parameters)
        if item.type == "cancelled":
            info = {"interrupted": True, "job": job.id}
            return {"images": [], "parameters": parameters, "info": json.dumps(info)}
        raise HttpError(500 if item.data.get("code") == "internal_error" else 422,
                        str(item.data.get("code", "error")), str(item.data.get("message", "")))

    def _response(self, item: Any, parameters: dict[str, Any]) -> dict[str, Any]:
        from sdcore.infotext import parse_infotext

        images = [base64.b64encode(payload).decode("ascii") for _, _, payload in item.blobs]
        d = item.data
        request = d.get("request", {})
        first = parse_infotext(d["infotexts"][0]) if d.get("infotexts") else None
        info = {
            "prompt": request.get("prompt", ""), "all_prompts": [request.get("prompt", "")] * len(images),
            "negative_prompt": request.get("negative_prompt", ""),
            "all_negative_prompts": [request.get("negative_prompt", "")] * len(images),
            "seed": d["seeds"][0] if d.get("seeds") else -1, "all_seeds": d.get("seeds", []),
            "subseed": request.get("subseed", -1),
            "all_subseeds": [img.get("subseed") for img in d.get("images", [])],
            "subseed_strength": request.get("subseed_strength", 0), "width": request.get("width"),
            "height": request.get("height"), "sampler_name": request.get("sampler"),
            "cfg_scale": request.get("cfg_scale"), "steps": request.get("steps"),
            "batch_size": request.get("batch_size", 1), "restore_faces": False, "face_restoration_model": None,
            "sd_model_name": d.get("model"), "sd_model_hash": d.get("model_hash"), "sd_vae_name": None,
            "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "denoising_strength": request.get("denoising_strength") if request.get("mode") != "txt2img" else None,
            "extra_generation_params": dict(first.params) if first else {}, "index_of_first_image": 0,
            "infotexts": d.get("infotexts", []), "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
            "clip_skip": request.get("clip_skip", 1), "is_using_inpainting_conditioning": False,
            "version": f"sdcore {self.server._version()}",
        }
        return {"images": images, "parameters": parameters, "info": json.dumps(info)}

    async def progress(self, owner: str, data: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        caller = self.callers.get(owner)
        active = [j for j in caller.jobs if not j.done] if caller else []
        current = active[0] if active else None
        state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                 "job_count": len(active), "job_timestamp": "0", "job_no": 0, "sampling_step": 0,
                 "sampling_steps": 0}
        progress, eta, image = 0.0, 0.0, None
        if current is not None:
            step, total = current.progress
            state.update(job=current.id, sampling_step=step, sampling_steps=total,
                         interrupted=current.cancel_requested,
                         job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(current.created)))
            progress = min(1.0, 0.01 + (step / total if total else 0.0) / max(1, len(active)))
            elapsed = time.time() - current.created
            eta = elapsed / progress - elapsed if progress > 0 else 0.0
            skip = params.get("skip_current_image", "false").lower() in ("1", "true", "yes")
            if caller and caller.preview and not skip:
                image = base64.b64encode(caller.preview).decode("ascii")
        return {"progress": progress, "eta_relative": eta, "state": state, "current_image": image,
                "textinfo": None}

    async def interrupt(self, owner: str, data: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        caller = self.callers.get(owner)
        cancelled = []
        for job in list(caller.jobs) if caller else []:
            if not job.done and self.server._cancel(job):
                cancelled.append(job.id)
        return {"interrupted": cancelled}

    # -- lists and options ----------------------------------------------------------------------------
    async def sd_models(self, **_: Any) -> list[dict[str, Any]]:
        return [{"title": _title(m), "model_name": m["name"], "hash": None, "sha256": None,
                 "filename": m["path"], "config": None} for m in self.server.model_entries()]

    async def samplers(self, **_: Any) -> list[dict[str, Any]]:
        return [{"name": s["name"], "aliases": s.get("aliases", []),
                 "options": {"scheduler": s.get("default_schedule", "Automatic")}}
                for s in self.server.engine.samplers.describe()]

    async def schedulers(self, **_: Any) -> list[dict[str, Any]]:
        labels = {v: k for k, v in SCHEDULERS.items()}
        found: list[str] = []
        for s in self.server.engine.samplers.describe():
            for label in s.get("schedule_types", []):
                if label not in found:
                    found.append(label)
        return [{"name": labels.get(label, label.lower().replace(" ", "_")), "label": label, "aliases": None,
                 "default_rho": -1, "need_inner_model": False} for label in found]

    async def _plugin_list(self, method: str, owner: str) -> list[Any]:
        handler, plugin = self.server.methods[method]
        if plugin == "sdcore-bridge":
            return []
        from .server import MethodContext

        context = MethodContext(self.server, None, owner)
        if inspect.iscoroutinefunction(handler):
            result = await handler({}, context)
        else:
            result = await asyncio.to_thread(handler, {}, context)
        if isinstance(result, dict):
            result = result.get("items", [])
        return list(result or [])

    async def loras(self, owner: str, **_: Any) -> list[dict[str, Any]]:
        items = await self._plugin_list("list_loras", owner)
        return [item if isinstance(item, dict) else {"name": str(item), "alias": str(item), "path": None,
                                                     "metadata": {}} for item in items]

    async def embeddings(self, owner: str, **_: Any) -> dict[str, Any]:
        items = await self._plugin_list("list_embeddings", owner)
        loaded = {}
        for item in items:
            name = item.get("name") if isinstance(item, dict) else str(item)
            loaded[str(name)] = item if isinstance(item, dict) else {}
        return {"loaded": loaded, "skipped": {}}

    async def scripts(self, **_: Any) -> dict[str, list[str]]:
        return {"txt2img": [], "img2img": []}

    async def upscalers(self, **_: Any) -> list[dict[str, Any]]:
        return [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 1}]

    def _current_model(self) -> dict[str, Any] | None:
        entries = self.server.model_entries()
        if self.model:
            for e in entries:
                if self.model in (e["name"], e["path"], _title(e)):
                    return e
        return next((e for e in entries if e.get("default")), entries[0] if entries else None)

    async def get_options(self, **_: Any) -> dict[str, Any]:
        current = self._current_model()
        return {"sd_model_checkpoint": _title(current) if current else None, "sd_checkpoint_hash": None,
                "CLIP_stop_at_last_layers": 1, "samples_format": "png", "sd_vae": "Automatic"}

    async def set_options(self, owner: str, data: dict[str, Any], **_: Any) -> None:
        name = data.get("sd_model_checkpoint")
        if name is not None:
            if not isinstance(name, str):
                raise HttpError(422, "invalid_request", "sd_model_checkpoint must be a string")
            path = self._model_path(name)
            try:
                await asyncio.to_thread(self.server.engine.load_model, path)
            except Exception as exc:  # noqa: BLE001 - reported to the caller
                raise HttpError(422, "model_error", f"cannot load {name!r}: {exc}") from None
            self.model = path
        return None

    async def png_info(self, owner: str, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        image = data.get("image")
        if not isinstance(image, str) or not image:
            raise HttpError(422, "invalid_request", "png-info needs `image`, a base64 image")
        raw = _b64_image(image, "image")

        def read() -> dict[str, Any]:
            from sdcore.errors import SdcoreError
            from sdcore.infotext import a1111_params, parse_infotext, read_infotext

            try:
                text = read_infotext(raw)
            except SdcoreError as exc:
                raise HttpError(422, "bad_image", str(exc)) from None
            if not text:
                return {"info": "", "items": {}, "parameters": {}}
            try:
                parameters = a1111_params(parse_infotext(text))
            except Exception:  # noqa: BLE001 - fall back to the values as written
                parsed = parse_infotext(text)
                parameters = {"Prompt": parsed.prompt, "Negative prompt": parsed.negative_prompt, **parsed.params}
            return {"info": text, "items": {"parameters": text}, "parameters": _plain(parameters)}

        return await asyncio.to_thread(read)


def _title(entry: dict[str, Any]) -> str:
    from pathlib import PurePath

    return PurePath(str(entry["path"])).name


def _b64_image(value: Any, field: str) -> bytes:
    """A1111 image fields: base64 with or without a data: URL prefix (never a server file path)."""
    if not isinstance(value, str):
        raise HttpError(422, "invalid_request", f"{field} must be a base64 string")
    text = value.strip()
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(422, "invalid_request", f"{field} is not valid base64 image data") from None


def _invert(mask: bytes) -> bytes:
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(mask)) as im:
        inverted = ImageOps.invert(im.convert("L"))
    buf = io.BytesIO()
    inverted.save(buf, format="PNG")
    return buf.getvalue()


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _dumps(payload: Any) -> bytes:
    text = json.dumps(payload, separators=(",", ":"))
    return text.encode("utf-8")
