"""An asyncio client for the sdcore bridge protocol v1 (used by the tests, the Krita extension and scripts).

Only the standard library, `websockets` and `sdcore_bridges.protocol` are needed, so an editor extension can
carry a copy of this file.

    async with BridgeClient("ws://127.0.0.1:7862", token=None) as client:
        job = await client.submit({"prompt": "a red fox", "steps": 20}, images={"init_image": png_bytes})
        async for event in job.events():
            print(event.type, event.data)
        result = await job.result()
        open("fox.png", "wb").write(result.images[0].data)   # lossless PNG with its infotext

The client resumes its session after a dropped connection (`reconnect=True`): it reconnects with backoff,
sends its session id and the last sequence number it saw, and the server replays what it missed, so a result
produced while it was away is still delivered.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

try:  # inside the sdcore distribution
    from . import protocol as P
except ImportError:  # pragma: no cover - a vendored copy next to protocol.py (editor extensions)
    import protocol as P  # type: ignore[no-redef]

log = logging.getLogger("sdcore.bridge.client")
CLIENT_VERSION = "0.1.0"


class BridgeError(Exception):
    """An `error` from the server (or a connection failure), with the protocol's typed fields."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None,
                 retryable: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details or {}
        self.retryable = retryable

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> BridgeError:
        return cls(str(data.get("code", "error")), str(data.get("message", "")), data.get("details") or {},
                   bool(data.get("retryable", False)))


class JobCancelledError(BridgeError):
    pass


@dataclass
class ResultImage:
    index: int
    data: bytes | None  # the PNG file, with its infotext in the `parameters` chunk
    seed: int
    infotext: str
    width: int
    height: int
    mime: str = "image/png"
    subseed: int | None = None

    def image(self) -> Any:
        from PIL import Image

        assert self.data is not None
        return Image.open(io.BytesIO(self.data))


@dataclass
class JobEvent:
    type: str
    job: str
    data: dict[str, Any]
    seq: int | None = None
    images: list[ResultImage] | None = None  # result events
    preview: bytes | None = None  # preview events (JPEG)

    @property
    def terminal(self) -> bool:
        return self.type in P.TERMINAL_EVENTS


@dataclass
class JobResult:
    job: str
    images: list[ResultImage]
    data: dict[str, Any] = field(default_factory=dict)


class ClientJob:
    """A job this client submitted or subscribed to: its events in order and its outcome."""

    def __init__(self, client: BridgeClient, job_id: str) -> None:
        self.client = client
        self.id = job_id
        self.history: list[JobEvent] = []
        self.latest_preview: JobEvent | None = None
        self.state = "queued"
        self._changed = asyncio.Event()

    def __repr__(self) -> str:
        return f"<ClientJob {self.id[:8]} {self.state}>"

    @property
    def done(self) -> bool:
        return bool(self.history) and self.history[-1].terminal

    def _add(self, event: JobEvent) -> None:
        if self.done:
            return
        if event.type == "preview":
            self.latest_preview = event
        else:
            self.history.append(event)
            self.state = {"result": "done", "error": "failed", "cancelled": "cancelled",
                          "started": "running"}.get(event.type, self.state)
        self._changed.set()
        for callback in list(self.client.on_event):
            try:
                callback(self, event)
            except Exception:  # noqa: BLE001 - a broken callback must not stop the client
                log.exception("on_event callback failed")

    async def events(self, *, previews: bool = False) -> AsyncIterator[JobEvent]:
        """Every event from the first, ending with the terminal one (`previews`: also the latest previews)."""
        index, last_preview = 0, None
        while True:
            while index < len(self.history):
                event = self.history[index]
                index += 1
                yield event
                if event.terminal:
                    return
            if previews and self.latest_preview is not None and self.latest_preview is not last_preview:
                last_preview = self.latest_preview
                yield last_preview
                continue
            self._changed.clear()
            if index >= len(self.history) and not (previews and self.latest_preview is not last_preview):
                await self._changed.wait()

    async def wait(self, timeout: float | None = None) -> JobEvent:
        async def last() -> JobEvent:
            async for event in self.events():
                if event.terminal:
                    return event
            raise AssertionError("unreachable")

        return await asyncio.wait_for(last(), timeout)

    async def result(self, timeout: float | None = None) -> JobResult:
        """The images; raises `BridgeError` if the job failed and `JobCancelledError` if it was cancelled."""
        event = await self.wait(timeout)
        if event.type == "result":
            return JobResult(self.id, event.images or [], event.data)
        if event.type == "cancelled":
            raise JobCancelledError("cancelled", f"job {self.id} was cancelled", event.data)
        raise BridgeError.from_data(event.data)

    async def cancel(self) -> dict[str, Any]:
        return await self.client.cancel(self.id)


class BridgeClient:
    """One session with a bridge server. All methods are coroutines of the loop that called `connect`."""

    def __init__(self, url: str, *, token: str | None = None, client_name: str = "sdcore-python",
                 client_version: str = CLIENT_VERSION, previews: bool = False, preview_interval_ms: int = 250,
                 preview_max_size: int = 256, reconnect: bool = True, max_retry_delay: float = 5.0,
                 open_timeout: float = 10.0, ping_interval: float = 10.0, request_timeout: float = 120.0,
                 protocol_versions: tuple[int, ...] | list[int] = (P.PROTOCOL_VERSION,),
                 session: str | None = None, last_seq: int = 0, origin: str | None = None,
                 reconnect_attempts: int = 50) -> None:
        self.url = url
        self.token = token
        self.client_name, self.client_version = client_name, client_version
        self.previews = {"enabled": previews, "interval_ms": preview_interval_ms, "max_size": preview_max_size}
        self.reconnect = reconnect
        self.max_retry_delay = max_retry_delay
        self.reconnect_attempts = reconnect_attempts
        self.open_timeout = open_timeout
        self.ping_interval = ping_interval
        self.request_timeout = request_timeout
        self.protocol_versions = list(protocol_versions)
        self.origin = origin
        self.session = session
        self.last_seq = last_seq
        self.welcome: dict[str, Any] = {}
        self.jobs: dict[str, ClientJob] = {}
        self.unsolicited_errors: list[dict[str, Any]] = []
        self.on_event: list[Callable[[ClientJob, JobEvent], None]] = []
        self.reconnects = 0
        self.trace: Callable[[dict[str, Any]], None] | None = None  # sees every decoded frame (tests)
        self.duplicates = 0
        self._ws: ClientConnection | None = None
        self._ids = itertools.count(1)
        self._pending: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self._blobs: dict[str, tuple[dict[str, Any], bytearray]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._pinger: asyncio.Task[None] | None = None
        self._closing = False
        self._connected = asyncio.Event()
        self._send_lock = asyncio.Lock()

    # -- connection -----------------------------------------------------------------------------------
    async def __aenter__(self) -> BridgeClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def limits(self) -> dict[str, int]:
        return self.welcome.get("limits", P.DEFAULT_LIMITS)

    @property
    def connected(self) -> bool:
        return self._ws is not None and self._connected.is_set()

    async def connect(self) -> dict[str, Any]:
        """Open the connection and do the handshake; returns the server's welcome data."""
        self._closing = False
        welcome = await self._open()
        self._reader = asyncio.ensure_future(self._read_loop())
        if self.ping_interval:
            self._pinger = asyncio.ensure_future(self._ping_loop())
        return welcome

    async def _open(self) -> dict[str, Any]:
        try:
            ws = await connect(self.url, max_size=P.DEFAULT_LIMITS["transport_max_frame"] * 2, compression=None,
                               open_timeout=self.open_timeout, origin=self.origin, max_queue=64,  # type: ignore[arg-type]
                               ping_interval=20, ping_timeout=60, close_timeout=2)
        except InvalidStatus as exc:
            status = exc.response.status_code
            raise BridgeError("forbidden" if status == 403 else "connect_failed",
                              f"the server refused the websocket handshake with HTTP {status}") from None
        except (OSError, asyncio.TimeoutError, TimeoutError) as exc:
            raise BridgeError("connect_failed", f"cannot connect to {self.url}: {exc}", retryable=True) from None
        hello = {"protocol": self.protocol_versions, "client": self.client_name,
                 "client_version": self.client_version, "token": self.token, "previews": self.previews}
        if self.session:
            hello["session"] = self.session
            hello["last_seq"] = self.last_seq
        try:
            await ws.send(P.dumps(P.envelope("hello", hello)))
            first = await asyncio.wait_for(ws.recv(), self.open_timeout)
        except ConnectionClosed as exc:
            raise BridgeError("connect_failed", f"the server closed the connection during the handshake ({exc})",
                              retryable=True) from None
        msg = P.parse_text(first) if isinstance(first, str) else {}
        if self.trace is not None:
            self.trace(msg)
        if msg.get("type") != "welcome":
            await ws.close()
            if msg.get("type") == "error":
                raise BridgeError.from_data(msg.get("data", {}))
            raise BridgeError("bad_frame", "the server did not answer hello with welcome")
        data = msg["data"]
        if self.session and not data.get("resumed"):
            self._session_lost(data.get("reason", "session not resumed"))
        self.session = data["session"]
        self.welcome = data
        self._ws = ws
        self._connected.set()
        return data

    def _session_lost(self, reason: str) -> None:
        self.last_seq = 0
        self._blobs.clear()
        for job in self.jobs.values():
            if not job.done:
                job._add(JobEvent("error", job.id, {"code": "session_lost", "message": reason}))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(BridgeError("session_lost", reason, retryable=True))
        self._pending.clear()

    async def close(self, *, bye: bool = False) -> None:
        """Close the connection. `bye=True` also ends the session on the server (its queued jobs stop)."""
        if bye and self.connected:
            try:
                await self.request("bye", timeout=5)
            except BridgeError:
                pass
        self._closing = True
        for task in (self._pinger, self._reader):
            if task is not None:
                task.cancel()
        if self._ws is not None:
            await self._ws.close()
            self._ws = None
        self._connected.clear()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(BridgeError("closed", "the client was closed"))

    async def drop_connection(self) -> None:
        """Abort the TCP connection without a close handshake (tests: a network failure); resumes if enabled."""
        if self._ws is not None:
            self._ws.transport.abort()

    async def _read_loop(self) -> None:
        while True:
            ws = self._ws
            assert ws is not None
            try:
                async for message in ws:
                    await self._on_message(message)
            except ConnectionClosed:
                pass
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep reading; a bad frame from the server is logged
                log.exception("bridge client: failed to handle a frame")
                continue
            self._connected.clear()
            close_code = ws.close_code
            if self._closing:
                return
            if close_code in (P.CLOSE_UNAUTHORIZED, P.CLOSE_INCOMPATIBLE, P.CLOSE_SESSION_ENDED,
                              P.CLOSE_SUPERSEDED) or not self.reconnect:
                self._ws = None
                self._session_lost(f"connection closed ({close_code})")
                return
            if not await self._reconnect():
                self._ws = None
                self._session_lost("could not reconnect")
                return

    async def _reconnect(self) -> bool:
        for attempt in range(self.reconnect_attempts):
            delay = min(self.max_retry_delay, 0.05 * 2**attempt) * (0.5 + random.random())
            await asyncio.sleep(delay)
            try:
                await self._open()
            except BridgeError as exc:
                if exc.code in ("unauthorized", "incompatible_protocol", "forbidden"):
                    return False
                continue
            self.reconnects += 1
            return True
        return False

    async def _ping_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ping_interval)
            if self.connected:
                try:
                    await self._send(P.envelope("ping", {"t": time.time(), "ack": self.last_seq}))
                except (ConnectionClosed, BridgeError):
                    pass

    async def _send(self, message: dict[str, Any] | bytes) -> None:
        ws = self._ws
        if ws is None:
            raise BridgeError("not_connected", "the client is not connected", retryable=True)
        frame = message if isinstance(message, bytes) else P.dumps(message)
        async with self._send_lock:
            await ws.send(frame)

    # -- incoming ---------------------------------------------------------------------------------------
    def _fresh(self, seq: Any) -> bool:
        if not isinstance(seq, int):
            return True  # not in the reliable stream (pong, ping, preview)
        if seq <= self.last_seq:
            self.duplicates += 1
            return False
        self.last_seq = seq
        return True

    async def _on_message(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            header, payload = P.parse_binary(message)
            if self.trace is not None:
                self.trace({"binary": header})
            if not self._fresh(header.get("seq")):
                return
            if header.get("type") == "preview":
                job = self._job(header.get("job"))
                if job is not None:
                    job._add(JobEvent("preview", job.id, header, preview=bytes(payload)))
            elif header.get("type") == "blob":
                blob = header["blob"]
                if header.get("part", 0) == 0:
                    self._blobs[blob] = (header, bytearray())
                entry = self._blobs.get(blob)
                if entry is not None:
                    entry[1].extend(payload)
            return
        msg = P.parse_text(message)
        if self.trace is not None:
            self.trace(msg)
        if not self._fresh(msg.get("seq")):
            return
        kind, data, msg_id, job_id = msg["type"], msg["data"], msg.get("id"), msg.get("job")
        if kind in ("reply", "error", "pong") and msg_id is not None and msg_id in self._pending:
            fut = self._pending.pop(msg_id)
            if not fut.done():
                if kind != "error":
                    fut.set_result(data)
                else:
                    fut.set_exception(BridgeError.from_data(data))
            return
        if kind == "ping":
            if self.connected:
                await self._send(P.envelope("pong", {"t": data.get("t"), "ack": self.last_seq}))
            return
        if kind == "pong":
            return
        if kind == "error" and job_id is None:
            self.unsolicited_errors.append(data)
            return
        if kind == "job_status":
            return
        if kind in P.JOB_EVENTS and job_id is not None:
            job = self._job(job_id, create=True)
            assert job is not None
            event = JobEvent(kind, job_id, data, msg.get("seq"))
            if kind == "result":
                event.images = []
                for entry in data.get("images", []):
                    blob = self._blobs.pop(entry.get("blob"), None)
                    event.images.append(ResultImage(
                        index=entry.get("index", 0), data=bytes(blob[1]) if blob else None,
                        seed=entry.get("seed", -1), infotext=entry.get("infotext", ""),
                        width=entry.get("width", 0), height=entry.get("height", 0),
                        mime=entry.get("mime", "image/png"), subseed=entry.get("subseed")))
            job._add(event)
            if event.terminal and self.connected:
                try:
                    await self._send(P.envelope("ack", {"seq": self.last_seq}))
                except (ConnectionClosed, BridgeError):
                    pass

    def _job(self, job_id: Any, create: bool = False) -> ClientJob | None:
        if not isinstance(job_id, str):
            return None
        job = self.jobs.get(job_id)
        if job is None and create:
            job = self.jobs[job_id] = ClientJob(self, job_id)
        return job

    # -- requests -------------------------------------------------------------------------------------
    async def request(self, method: str, data: dict[str, Any] | None = None, *,
                      timeout: float | None = None) -> dict[str, Any]:
        """Send one request and wait for its reply data; an `error` reply raises `BridgeError`."""
        if not self.connected:
            await asyncio.wait_for(self._connected.wait(), self.open_timeout)
        msg_id = f"c{next(self._ids)}"
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        try:
            await self._send(P.envelope(method, data or {}, id=msg_id))
        except ConnectionClosed:
            pass  # the reader reconnects; the request may be lost, so the timeout below decides
        try:
            return await asyncio.wait_for(fut, timeout or self.request_timeout)
        except (asyncio.TimeoutError, TimeoutError):
            raise BridgeError("timeout", f"no reply to {method} within {timeout or self.request_timeout} s",
                              retryable=True) from None
        finally:
            self._pending.pop(msg_id, None)

    async def upload(self, data: bytes, mime: str = "image/png", blob: str | None = None) -> str:
        """Send `data` as a blob in binary chunks; returns its id for `{"blob": id}` in a request."""
        blob = blob or f"b{secrets.token_hex(8)}"
        chunk = min(self.limits.get("chunk_size", 2**20), self.limits.get("max_binary_frame", 2**22) - 4096)
        for header, part in P.blob_frames(blob, data, mime=mime, chunk_size=chunk):
            await self._send(P.pack_binary(header, part))
        return blob

    async def _upload_images(self, value: Any) -> Any:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return {"blob": await self.upload(bytes(value), _sniff_mime(bytes(value[:16])))}
        if hasattr(value, "save") and hasattr(value, "size"):  # a PIL image
            buf = io.BytesIO()
            value.save(buf, format="PNG")
            return {"blob": await self.upload(buf.getvalue(), "image/png")}
        if isinstance(value, dict):
            return {k: await self._upload_images(v) for k, v in value.items()}
        if isinstance(value, list):
            return [await self._upload_images(v) for v in value]
        return value

    async def submit(self, request: dict[str, Any], *, images: dict[str, Any] | None = None) -> ClientJob:
        """Queue a generation request (any mode, any plugin options). Image values (bytes, PIL images) in
        `request` or in `images` (merged into it) are uploaded as blobs first."""
        request = await self._upload_images({**request, **(images or {})})
        reply = await self.request("submit", {"request": request})
        return self._job(reply["job"], create=True)  # type: ignore[return-value]

    async def replace(self, job: str | ClientJob, request: dict[str, Any], *, images: dict[str, Any] | None = None,
                      cancel_running: bool = False) -> ClientJob:
        """Put `request` in the place of queued job `job` (live painting); that job ends `cancelled`."""
        request = await self._upload_images({**request, **(images or {})})
        job_id = job.id if isinstance(job, ClientJob) else job
        reply = await self.request("replace", {"job": job_id, "request": request, "cancel_running": cancel_running})
        return self._job(reply["job"], create=True)  # type: ignore[return-value]

    async def cancel(self, job: str | ClientJob) -> dict[str, Any]:
        return await self.request("cancel", {"job": job.id if isinstance(job, ClientJob) else job})

    async def subscribe(self, job_id: str) -> ClientJob:
        """Watch a job another session owns (its id is the capability); its past events are replayed."""
        job = self._job(job_id, create=True)
        await self.request("subscribe", {"job": job_id})
        return job  # type: ignore[return-value]

    async def generate(self, request: dict[str, Any], *, images: dict[str, Any] | None = None,
                       timeout: float | None = None) -> JobResult:
        job = await self.submit(request, images=images)
        return await job.result(timeout)

    async def list_models(self) -> list[dict[str, Any]]:
        return (await self.request("list_models"))["items"]

    async def list_samplers(self) -> list[dict[str, Any]]:
        return (await self.request("list_samplers"))["items"]

    async def list_loras(self) -> list[Any]:
        return (await self.request("list_loras"))["items"]

    async def list_embeddings(self) -> list[Any]:
        return (await self.request("list_embeddings"))["items"]

    async def get_schema(self) -> dict[str, Any]:
        return (await self.request("get_schema"))["schema"]

    async def ping(self) -> float:
        """Round-trip time of one application-level ping, in seconds."""
        start = time.perf_counter()
        await self.request("ping", {"t": time.time(), "ack": self.last_seq})
        return time.perf_counter() - start


def _sniff_mime(head: bytes) -> str:
    if head.startswith(b"\x89PNG"):
        return "image/png"
    if head.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"
