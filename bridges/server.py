"""The bridge server: sdcore's Engine served over websocket protocol v1 (`docs/bridge-protocol.md`).

One asyncio loop owns all bridge state (sessions, jobs, the fair queue); the engine's worker thread hands job
events to it with `call_soon_threadsafe`, after encoding result PNGs and preview JPEGs in that worker thread so
the loop never does heavy work. Each connection has its own writer task that drains its session's outbox, so a
slow client only ever waits on itself. The outbox doubles as the replay buffer for resume.

    server = BridgeServer(engine, port=0)
    handle = server.start_in_thread()        # or: await server.start(); await server.serve_forever()
    print(handle.url)                         # ws://127.0.0.1:PORT
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import inspect
import ipaddress
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from . import protocol as P
from .protocol import ProtocolError

if TYPE_CHECKING:
    from sdcore import Engine, Event, Job

log = logging.getLogger("sdcore.bridge")

SERVER_NAME = "sdcore-bridge"
DEFAULT_PORT = 7862
MethodHandler = Callable[[dict[str, Any], "MethodContext"], Any]


class BridgeConfigError(ValueError):
    """The server was configured unsafely (e.g. a public bind without a token)."""


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _jsonable(value: Any) -> Any:
    """Plain JSON types only (enums by value, bytes and objects as short placeholders)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    enum_value = getattr(value, "value", None)
    if isinstance(enum_value, (str, int)):
        return enum_value
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return _jsonable(dump(mode="python"))
    return f"<{type(value).__name__}>"


@dataclass
class MethodContext:
    """What a protocol method handler (built-in or from `register_bridge_methods`) gets besides its params."""

    server: BridgeServer
    session_id: str | None
    owner: str

    @property
    def engine(self) -> Engine:
        return self.server.engine


@dataclass
class JobMessage:
    """One reliable job event as the protocol sends it: envelope type, data and the blobs it carries."""

    type: str
    data: dict[str, Any]
    blobs: list[tuple[str, str, bytes]] = field(default_factory=list)  # (blob id, mime, bytes)

    @property
    def terminal(self) -> bool:
        return self.type in P.TERMINAL_EVENTS


@dataclass
class BridgeJob:
    id: str
    owner: str
    session_id: str | None
    raw_request: dict[str, Any]
    request_summary: dict[str, Any]
    previews: bool = False
    state: str = "queued"  # queued, dispatching, running, done, failed, cancelled
    history: list[JobMessage] = field(default_factory=list)
    watchers: dict[str, Callable[[BridgeJob, Any], None]] = field(default_factory=dict)
    engine_job: Job | None = None
    cancel_requested: bool = False
    progress: tuple[int, int] = (0, 0)
    created: float = field(default_factory=time.time)
    finished: float | None = None
    latest_preview: tuple[dict[str, Any], bytes] | None = None
    engine_next: int = 0
    engine_pending: dict[int, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.state in ("done", "failed", "cancelled")

    def status(self) -> dict[str, Any]:
        step, total = self.progress
        return {"job": self.id, "state": self.state, "step": step, "total": total, "created": self.created,
                "finished": self.finished}


class FairQueue:
    """Round-robin over owners: each owner's jobs run in order, owners take turns."""

    def __init__(self) -> None:
        self._queues: dict[str, collections.deque[BridgeJob]] = {}
        self._order: collections.deque[str] = collections.deque()

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def __contains__(self, job: BridgeJob) -> bool:
        return job in self._queues.get(job.owner, ())

    def push(self, job: BridgeJob) -> None:
        queue = self._queues.get(job.owner)
        if queue is None:
            queue = self._queues[job.owner] = collections.deque()
            self._order.append(job.owner)
        queue.append(job)

    def pop(self) -> BridgeJob | None:
        if not self._order:
            return None
        owner = self._order.popleft()
        queue = self._queues[owner]
        job = queue.popleft()
        if queue:
            self._order.append(owner)
        else:
            del self._queues[owner]
        return job

    def remove(self, job: BridgeJob) -> bool:
        queue = self._queues.get(job.owner)
        if queue is None or job not in queue:
            return False
        queue.remove(job)
        if not queue:
            del self._queues[job.owner]
            self._order.remove(job.owner)
        return True

    def replace(self, old: BridgeJob, new: BridgeJob) -> bool:
        queue = self._queues.get(old.owner)
        if queue is None or old not in queue or new.owner != old.owner:
            return False
        queue[queue.index(old)] = new
        return True

    def position(self, job: BridgeJob) -> int:
        """How many queued jobs run before `job` if nothing else is submitted (0 = next)."""
        queue = self._queues.get(job.owner)
        if queue is None or job not in queue:
            return 0
        k = queue.index(job)
        rank = self._order.index(job.owner)
        before = k
        for r, owner in enumerate(self._order):
            if owner != job.owner:
                before += min(len(self._queues[owner]), k + (1 if r < rank else 0))
        return before


class Session:
    """A client's session: outbox/replay buffer with sequence numbers, blobs, jobs; outlives connections."""

    def __init__(self, server: BridgeServer, client: dict[str, Any]) -> None:
        self.server = server
        self.id = secrets.token_urlsafe(18)
        self.owner = f"ws:{self.id}"
        self.client = client
        limits = server.limits
        self.seq = 0
        self.frames: collections.deque[tuple[int, str | bytes]] = collections.deque()
        self.frame_bytes = 0
        self.sent_upto = 0
        self.lost_upto = 0  # frames up to here were dropped unsent (client too slow)
        self.blobs = P.BlobAssembler(limits["max_blob_bytes"], limits["max_session_blob_bytes"], limits["max_blobs"])
        self.jobs: dict[str, BridgeJob] = {}  # owned
        self.watching: set[str] = set()
        self.previews: dict[str, tuple[dict[str, Any], bytes]] = {}
        self.preview_enabled = False
        self.preview_interval = 0.25
        self.preview_max_size = 256
        self.last_preview_sent = 0.0
        self.ws: ServerConnection | None = None
        self.wake = asyncio.Event()
        self.disconnected_at: float | None = None
        self.expiry: asyncio.TimerHandle | None = None
        self.closed = False

    # -- outbox ---------------------------------------------------------------------------------------
    def push(self, message: dict[str, Any]) -> None:
        self.seq += 1
        message["seq"] = self.seq
        self._append(P.dumps(message))

    def push_binary(self, header: dict[str, Any], payload: bytes | memoryview) -> None:
        self.seq += 1
        header["seq"] = self.seq
        self._append(P.pack_binary(header, payload))

    def _append(self, frame: str | bytes) -> None:
        self.frames.append((self.seq, frame))
        self.frame_bytes += len(frame)
        limits = self.server.limits
        overflow = False
        while len(self.frames) > limits["replay_frames"] or self.frame_bytes > limits["replay_bytes"]:
            seq, old = self.frames.popleft()
            self.frame_bytes -= len(old)
            if seq > self.sent_upto:
                overflow = True
                self.lost_upto = seq
                self.sent_upto = seq
        if overflow and self.ws is not None:
            log.warning("session %s: client too slow, closing its connection", self.id[:8])
            ws = self.ws
            asyncio.ensure_future(ws.close(P.CLOSE_TOO_SLOW, "client too slow: send buffer overflow; resume"))
        self.wake.set()

    def ack(self, seq: Any) -> None:
        if not isinstance(seq, int) or isinstance(seq, bool):
            return
        seq = min(seq, self.sent_upto)
        while self.frames and self.frames[0][0] <= seq:
            _, old = self.frames.popleft()
            self.frame_bytes -= len(old)

    def reply(self, msg_id: Any, data: dict[str, Any]) -> None:
        self.push(P.envelope("reply", data, id=msg_id))

    def error(self, exc: ProtocolError, msg_id: Any = None) -> None:
        self.push(P.envelope("error", exc.to_data(), id=msg_id if msg_id is not None else exc.id))

    # -- job events -----------------------------------------------------------------------------------
    def deliver(self, job: BridgeJob, item: Any) -> None:
        """Called (in the loop) for each event of a job this session owns or watches."""
        if isinstance(item, tuple):  # a preview: latest wins, never buffered for replay
            if self.preview_enabled and self.ws is not None:
                self.previews[job.id] = item
                self.wake.set()
            return
        chunk = self.server.limits["chunk_size"]
        for blob, mime, payload in item.blobs:
            for header, part in P.blob_frames(blob, payload, mime=mime, chunk_size=chunk, extra={"job": job.id}):
                self.push_binary(header, part)
        self.push(P.envelope(item.type, dict(item.data), job=job.id))
        if item.terminal:
            self.previews.pop(job.id, None)


class _Handle:
    """A server running in a background thread (tests, scripts, the benchmark)."""

    def __init__(self, server: BridgeServer, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        self.server, self.loop, self.thread = server, loop, thread

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def http_url(self) -> str | None:
        return self.server.http_url

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` in the server's loop and return its result (for tests)."""
        async def run() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    def stop(self) -> None:
        if self.thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(30)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)

    def __enter__(self) -> _Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class BridgeServer:
    """Serves an `Engine` over protocol v1 (and, with `a1111_port`, the A1111-compatible HTTP API).

    Args:
        engine: the engine to serve; the server never closes it.
        host, port: where to listen; port 0 picks a free one (see `.port`).
        token: required in `hello` (and on the HTTP API) when set; mandatory for any non-loopback bind.
        allowed_origins: browser `Origin` values accepted; requests without an `Origin` header (native clients)
            are always accepted, requests with any other Origin get HTTP 403.
        limits: overrides of `protocol.DEFAULT_LIMITS`.
        a1111_port: also serve the A1111 HTTP API on this port (0 = any free port); None = off.
        allow_paths: accept `vae`/`config` paths and any `model` path from clients (off: only listed models).
    """

    def __init__(self, engine: Engine, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 token: str | None = None, allowed_origins: tuple[str, ...] | list[str] = (),
                 limits: dict[str, int] | None = None, a1111_port: int | None = None,
                 a1111_host: str | None = None, allow_paths: bool = False) -> None:
        if token is not None and not token:
            raise BridgeConfigError("The token must not be empty.")
        if token is None and not is_loopback(host):
            raise BridgeConfigError(
                f"Refusing to listen on {host} without a token: anyone who can reach it could use the GPU. "
                "Pass --token (or SDCORE_TOKEN), or bind 127.0.0.1.")
        if token is None and a1111_host is not None and not is_loopback(a1111_host):
            raise BridgeConfigError(f"Refusing to serve the A1111 API on {a1111_host} without a token.")
        self.engine = engine
        self.host, self.port = host, port
        self.token = token
        self.allowed_origins = tuple(allowed_origins)
        self.limits = {**P.DEFAULT_LIMITS, **(limits or {})}
        self.allow_paths = allow_paths
        self.a1111_port, self.a1111_host = a1111_port, a1111_host or host
        self.sessions: dict[str, Session] = {}
        self.jobs: dict[str, BridgeJob] = {}
        self.queue = FairQueue()
        self.running: BridgeJob | None = None
        self._dispatching = False
        self.methods: dict[str, tuple[MethodHandler, str]] = {}
        self._ws_server: Any = None
        self._http: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._collect_methods()

    # -- set-up ---------------------------------------------------------------------------------------
    def _collect_methods(self) -> None:
        from sdcore.errors import PluginError

        builtin = {name: getattr(self, f"_m_{name}") for name in P.METHODS}
        for name, fn in builtin.items():
            self.methods[name] = (fn, "sdcore-bridge")
        plugin_names: set[str] = set()
        for impl in self.engine.pm.hook.register_bridge_methods.get_hookimpls():

            def register(name: str, handler: MethodHandler, _owner: str = impl.plugin_name) -> None:
                if not isinstance(name, str) or not name.replace("_", "").replace(".", "").isalnum():
                    raise PluginError(f"Bridge method names are letters, digits, '_' and '.'; {_owner} gave {name!r}")
                if not callable(handler):
                    raise PluginError(f"Bridge method {name!r} of {_owner} needs a callable handler")
                overridable = name in ("list_loras", "list_embeddings") and name not in plugin_names
                if name in self.methods and not overridable:
                    raise PluginError(f"Bridge method {name!r} is registered twice (by "
                                      f"{self.methods[name][1]} and {_owner}).")
                self.methods[name] = (handler, _owner)
                plugin_names.add(name)

            impl.function(register=register)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}"

    @property
    def http_url(self) -> str | None:
        if self._http is None:
            return None
        host = f"[{self.a1111_host}]" if ":" in self.a1111_host else self.a1111_host
        return f"http://{host}:{self._http.port}"

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._ws_server = await serve(
            self._handle, self.host, self.port,
            origins=[None, *self.allowed_origins],
            max_size=self.limits["transport_max_frame"], max_queue=16, write_limit=2**20,
            compression=None, ping_interval=20, ping_timeout=60, close_timeout=5,
            server_header=SERVER_NAME,
        )
        self.port = self._ws_server.sockets[0].getsockname()[1]
        if self.a1111_port is not None:
            from .a1111 import A1111Api

            self._http = A1111Api(self)
            await self._http.start(self.a1111_host, self.a1111_port)
        self._spawn(self._janitor())
        log.info("sdcore bridge listening on %s", self.url)

    async def serve_forever(self) -> None:
        assert self._ws_server is not None
        await self._ws_server.serve_forever()

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
        if self._ws_server is not None:
            self._ws_server.close(close_connections=True)
            await self._ws_server.wait_closed()
        for queue in list(self.queue._queues.values()):
            for job in list(queue):
                self._cancel(job)
        if self.running is not None:
            self._cancel(self.running)
        for task in list(self._tasks):
            task.cancel()

    def start_in_thread(self) -> _Handle:
        ready = threading.Event()
        errors: list[BaseException] = []
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
                errors.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        thread = threading.Thread(target=run, name="sdcore-bridge", daemon=True)
        thread.start()
        ready.wait(60)
        if errors:
            raise errors[0]
        return _Handle(self, loop, thread)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _janitor(self) -> None:
        """Forget finished jobs after `result_ttl_s`."""
        while True:
            await asyncio.sleep(min(30.0, max(0.5, self.limits["result_ttl_s"] / 4)))
            cutoff = time.time() - self.limits["result_ttl_s"]
            for job in list(self.jobs.values()):
                if job.done and job.finished is not None and job.finished < cutoff:
                    self._forget(job)

    def _forget(self, job: BridgeJob) -> None:
        self.jobs.pop(job.id, None)
        session = self.sessions.get(job.session_id or "")
        if session is not None:
            session.jobs.pop(job.id, None)
        for sid in list(job.watchers):
            watcher = self.sessions.get(sid)
            if watcher is not None:
                watcher.watching.discard(job.id)
        job.watchers.clear()

    # -- connections ----------------------------------------------------------------------------------
    def check_token(self, token: Any) -> bool:
        if self.token is None:
            return True
        if not isinstance(token, str):
            return False
        return hmac.compare_digest(token.encode("utf-8"), self.token.encode("utf-8"))

    async def _refuse(self, ws: ServerConnection, code: str, message: str, close_code: int,
                      details: dict[str, Any] | None = None) -> None:
        try:
            await ws.send(P.dumps(P.envelope("error", ProtocolError(code, message, details=details).to_data())))
            await ws.close(close_code, message[:120])
        except ConnectionClosed:
            pass

    async def _handle(self, ws: ServerConnection) -> None:
        peer = ws.remote_address[0] if ws.remote_address else ""
        if self.token is None and not is_loopback(str(peer)):
            await self._refuse(ws, "unauthorized", "This server accepts loopback clients only.", P.CLOSE_UNAUTHORIZED)
            return
        try:
            first = await asyncio.wait_for(ws.recv(), self.limits["hello_timeout_s"])
        except (TimeoutError, asyncio.TimeoutError):
            await self._refuse(ws, "hello_required", "No hello within "
                               f"{self.limits['hello_timeout_s']} s.", P.CLOSE_HELLO_REQUIRED)
            return
        except ConnectionClosed:
            return
        session = await self._hello(ws, first)
        if session is None:
            return
        writer = asyncio.ensure_future(self._writer(session, ws))
        pinger = asyncio.ensure_future(self._pinger(ws))
        try:
            async for message in ws:
                if session.ws is not ws:  # superseded by a resumed connection
                    break
                await self._on_frame(session, message)
        except ConnectionClosed:
            pass
        finally:
            writer.cancel()
            pinger.cancel()
            if session.ws is ws:
                session.ws = None
                session.previews.clear()
                if not session.closed:
                    self._schedule_expiry(session)

    async def _hello(self, ws: ServerConnection, first: str | bytes) -> Session | None:
        if isinstance(first, bytes):
            await self._refuse(ws, "hello_required", "The first frame must be a JSON hello.", P.CLOSE_HELLO_REQUIRED)
            return None
        try:
            msg = P.parse_text(first, max_bytes=self.limits["max_text_frame"])
        except ProtocolError as exc:
            close = P.CLOSE_INCOMPATIBLE if exc.code == "unsupported_version" else P.CLOSE_HELLO_REQUIRED
            code = "incompatible_protocol" if exc.code == "unsupported_version" else "hello_required"
            await self._refuse(ws, code, f"The first frame must be a valid hello: {exc.message}", close,
                               {"supported": list(P.SUPPORTED_VERSIONS)})
            return None
        if msg["type"] != "hello":
            await self._refuse(ws, "hello_required", f"The first frame must be hello, not {msg['type']!r}.",
                               P.CLOSE_HELLO_REQUIRED)
            return None
        data = msg["data"]
        offered = data.get("protocol")
        offered_list = offered if isinstance(offered, list) else [offered]
        common = [v for v in offered_list if isinstance(v, int) and not isinstance(v, bool)
                  and v in P.SUPPORTED_VERSIONS]
        if not common:
            await self._refuse(ws, "incompatible_protocol",
                               f"This server speaks protocol {', '.join(map(str, P.SUPPORTED_VERSIONS))}; the "
                               f"client offered {offered!r}. Update the client or the server.",
                               P.CLOSE_INCOMPATIBLE, {"supported": list(P.SUPPORTED_VERSIONS)})
            return None
        if not self.check_token(data.get("token")):
            await asyncio.sleep(0.05)  # slow down guessing
            await self._refuse(ws, "unauthorized", "Missing or wrong token.", P.CLOSE_UNAUTHORIZED)
            return None
        last_seq = data.get("last_seq", 0)
        if not isinstance(last_seq, int) or isinstance(last_seq, bool) or last_seq < 0:
            last_seq = 0
        resumed, reason, gap = False, None, False
        wanted = data.get("session")
        session = self.sessions.get(wanted) if isinstance(wanted, str) else None
        if session is not None and not session.closed:
            resumed = True
            if session.expiry is not None:
                session.expiry.cancel()
                session.expiry = None
            old = session.ws
            session.ws = None
            if old is not None:
                self._spawn(old.close(P.CLOSE_SUPERSEDED, "session resumed on another connection"))
            last_seq = min(last_seq, session.seq)
            first_held = session.frames[0][0] if session.frames else session.seq + 1
            gap = last_seq < session.lost_upto or last_seq + 1 < first_held
            while session.frames and session.frames[0][0] <= last_seq:  # the client has these
                _, old_frame = session.frames.popleft()
                session.frame_bytes -= len(old_frame)
            # resend everything after last_seq that is still held
            session.sent_upto = session.frames[0][0] - 1 if session.frames else session.seq
        else:
            if wanted is not None:
                reason = "unknown or expired session; a new one was started"
            if len(self.sessions) >= self.limits["max_sessions"]:
                await self._refuse(ws, "limit_exceeded", "Too many sessions; try again later.", 1013)
                return None
            session = Session(self, {"name": str(data.get("client", ""))[:100],
                                     "version": str(data.get("client_version", ""))[:50]})
            self.sessions[session.id] = session
        previews = data.get("previews")
        if isinstance(previews, dict):
            session.preview_enabled = bool(previews.get("enabled", True))
            interval = previews.get("interval_ms", 250)
            if isinstance(interval, (int, float)) and not isinstance(interval, bool):
                session.preview_interval = min(10.0, max(0.02, interval / 1000))
            size = previews.get("max_size", 256)
            if isinstance(size, int) and not isinstance(size, bool):
                session.preview_max_size = min(1024, max(32, size))
        elif isinstance(previews, bool):
            session.preview_enabled = previews
        session.disconnected_at = None
        welcome = {
            "protocol": P.PROTOCOL_VERSION, "server": SERVER_NAME, "server_version": self._version(),
            "session": session.id, "resumed": resumed, "last_seq": session.seq, "gap": gap,
            "capabilities": {
                "methods": sorted(self.methods), "events": list(P.JOB_EVENTS),
                "image_formats": ["image/png", "image/jpeg", "image/webp"], "previews": True,
                "preview_format": "image/jpeg", "result_format": "image/png", "auth": self.token is not None,
                "a1111_api": self.http_url,
            },
            "limits": dict(self.limits),
            "engine": _jsonable(self.engine.info()),
            "models": self.model_entries(),
        }
        if reason:
            welcome["reason"] = reason
        try:
            await ws.send(P.dumps(P.envelope("welcome", welcome)))
        except ConnectionClosed:
            self._schedule_expiry(session)
            return None
        session.ws = ws
        if gap:
            self._catch_up(session)
        session.wake.set()
        return session

    def _catch_up(self, session: Session) -> None:
        """After a gap in the replay buffer: every job's status, and the terminal event of finished ones."""
        for job_id in [*session.jobs, *session.watching]:
            job = self.jobs.get(job_id)
            if job is None:
                continue
            session.push(P.envelope("job_status", job.status(), job=job.id))
            if job.done and job.history and job.history[-1].terminal:
                session.deliver(job, job.history[-1])

    def _schedule_expiry(self, session: Session) -> None:
        session.disconnected_at = time.time()
        loop = asyncio.get_running_loop()
        if session.expiry is not None:
            session.expiry.cancel()
        session.expiry = loop.call_later(self.limits["session_ttl_s"], self._expire, session)

    def _expire(self, session: Session) -> None:
        if session.ws is not None:
            return
        self._end_session(session)

    def _end_session(self, session: Session) -> None:
        session.closed = True
        self.sessions.pop(session.id, None)
        for job in list(session.jobs.values()):
            if not job.done:
                self._cancel(job)
        for job_id in list(session.watching):
            job = self.jobs.get(job_id)
            if job is not None:
                job.watchers.pop(session.id, None)
        session.frames.clear()
        session.blobs.complete.clear()
        session.blobs.partial.clear()

    async def _writer(self, session: Session, ws: ServerConnection) -> None:
        try:
            while session.ws is ws:
                session.wake.clear()
                while session.ws is ws and session.frames:
                    index = max(0, session.sent_upto + 1 - session.frames[0][0])
                    if index >= len(session.frames):
                        break
                    seq, frame = session.frames[index]
                    await ws.send(frame)
                    session.sent_upto = max(session.sent_upto, seq)
                if session.ws is not ws:
                    return
                if session.previews:
                    due = session.last_preview_sent + session.preview_interval
                    now = time.monotonic()
                    if now >= due:
                        previews = list(session.previews.values())
                        session.previews.clear()
                        session.last_preview_sent = now
                        for header, payload in previews:
                            await ws.send(P.pack_binary(header, payload))
                        continue
                    try:
                        await asyncio.wait_for(session.wake.wait(), due - now)
                    except (TimeoutError, asyncio.TimeoutError):
                        pass
                    continue
                await session.wake.wait()
        except ConnectionClosed:
            pass

    async def _pinger(self, ws: ServerConnection) -> None:
        interval = self.limits["ping_interval_s"]
        try:
            while True:
                await asyncio.sleep(interval)
                await ws.send(P.dumps(P.envelope("ping", {"t": time.time()})))
        except ConnectionClosed:
            pass

    # -- incoming frames ------------------------------------------------------------------------------
    async def _on_frame(self, session: Session, message: str | bytes) -> None:
        msg_id = None
        try:
            if isinstance(message, bytes):
                if len(message) > self.limits["max_binary_frame"]:
                    raise ProtocolError("frame_too_large", f"Binary frames may be at most "
                                        f"{self.limits['max_binary_frame']} bytes; send smaller chunks.",
                                        details={"limit": self.limits["max_binary_frame"]})
                header, payload = P.parse_binary(message)
                if header.get("type") != "blob":
                    raise ProtocolError("bad_frame", "Clients send binary frames of type 'blob' only.")
                session.blobs.add(header, payload)
                return
            msg = P.parse_text(message, max_bytes=self.limits["max_text_frame"])
            msg_id = msg.get("id")
            kind = msg["type"]
            data = msg["data"]
            if kind in ("ping",):
                session.ack(data.get("ack"))
                if session.ws is not None:
                    await session.ws.send(P.dumps(P.envelope("pong", {"t": data.get("t"), "server_t": time.time(),
                                                                       "last_seq": session.seq}, id=msg_id)))
                return
            if kind in ("pong", "ack"):
                session.ack(data.get("ack", data.get("seq")))
                return
            if kind == "hello":
                raise ProtocolError("already_hello", "hello was already received on this connection.", id=msg_id)
            if kind not in self.methods:
                known = kind in P.JOB_EVENTS or kind in ("welcome", "reply", "error", "job_status")
                raise ProtocolError("unknown_type" if known or msg_id is None else "unknown_method",
                                    f"{kind!r} is not a method this server offers; see welcome.capabilities."
                                    "methods.", id=msg_id, details={"type": kind[:64]})
            if msg_id is None:
                raise ProtocolError("bad_frame", f"Request {kind!r} needs an `id` to answer to.")
            handler, owner = self.methods[kind]
            if owner == "sdcore-bridge":
                result = handler(session, msg)
                if asyncio.iscoroutine(result):
                    result = await result
                if result is not None:
                    session.reply(msg_id, result)
                return
            context = MethodContext(self, session.id, session.owner)
            if inspect.iscoroutinefunction(handler):
                result = await handler(data, context)
            else:
                result = await asyncio.to_thread(handler, data, context)
            if asyncio.iscoroutine(result):
                result = await result
            session.reply(msg_id, _jsonable(result if isinstance(result, dict) else {"result": result}))
        except ProtocolError as exc:
            session.error(exc, msg_id)
        except Exception as exc:  # noqa: BLE001 - one failing request must not end the connection
            from sdcore.errors import SdcoreError

            if isinstance(exc, SdcoreError):
                err = ProtocolError("invalid_request" if exc.code in ("invalid_request", "bad_image",
                                    "unknown_sampler", "bad_prompt", "model_not_found") else exc.code,
                                    str(exc), details={"type": type(exc).__name__, "engine_code": exc.code})
                session.error(err, msg_id)
            else:
                log.exception("bridge request failed")
                session.error(ProtocolError("internal_error", f"{type(exc).__name__}: {exc}"), msg_id)

    # -- built-in methods: each returns the reply data (a dict), or None if it replied itself -----------
    def _job_arg(self, session: Session, msg: dict[str, Any], *, owned: bool) -> BridgeJob:
        job_id = msg["data"].get("job", msg.get("job"))
        if not isinstance(job_id, str):
            raise ProtocolError("invalid_params", "`data.job` (a job id string) is required.", id=msg.get("id"))
        job = self.jobs.get(job_id)
        if job is None or (owned and job.session_id != session.id) or (
                not owned and job.session_id != session.id and session.id not in job.watchers):
            raise ProtocolError("unknown_job", f"No job {job_id[:64]!r} " + ("owned by" if owned else "visible to")
                                + " this session.", details={"job": job_id[:64]}, id=msg.get("id"))
        return job

    async def _m_submit(self, session: Session, msg: dict[str, Any]) -> None:
        request = msg["data"].get("request")
        job = await self._new_job(session, msg, request)
        self._enqueue(job)
        session.reply(msg["id"], {"job": job.id, "position": self.queue.position(job)})
        self._start_job(session, job)

    async def _m_replace(self, session: Session, msg: dict[str, Any]) -> None:
        old = self._job_arg(session, msg, owned=True)
        cancel_running = bool(msg["data"].get("cancel_running", False))
        new = await self._new_job(session, msg, msg["data"].get("request"), replacing=old)
        replaced: str | None = None
        if old.state == "queued" and self.queue.replace(old, new):
            self.jobs[new.id] = new
            session.jobs[new.id] = new
            self._finish(old, JobMessage("cancelled", {"replaced_by": new.id, "t": time.time()}))
            replaced = old.id
        else:
            if cancel_running and not old.done:
                self._cancel(old, replaced_by=new.id)
                replaced = old.id
            self._enqueue(new)
        session.reply(msg["id"], {"job": new.id, "replaced": replaced, "position": self.queue.position(new)})
        self._start_job(session, new)

    def _start_job(self, session: Session, job: BridgeJob) -> None:
        job.watchers[session.id] = lambda j, item, s=session: s.deliver(j, item)
        self._publish(job, JobMessage("queued", {"position": self.queue.position(job), "t": time.time()}))
        self._dispatch()

    async def _new_job(self, session: Session, msg: dict[str, Any], request: Any,
                       replacing: BridgeJob | None = None) -> BridgeJob:
        if not isinstance(request, dict):
            raise ProtocolError("invalid_params", "`data.request` must be a generation request object "
                                "(see get_schema).", id=msg["id"])
        active = sum(1 for j in session.jobs.values() if not j.done)
        if replacing is not None and replacing.state == "queued":
            active -= 1
        if active >= self.limits["max_pending_jobs"]:
            raise ProtocolError("limit_exceeded", f"A session may have at most {self.limits['max_pending_jobs']}"
                                " jobs queued or running.", id=msg["id"], retryable=True)
        raw = self._resolve_blobs(session, request, msg["id"])
        summary = await self.validate_request(raw, msg_id=msg["id"])
        previews = session.preview_enabled
        if previews and not raw.get("preview_every"):
            raw["preview_every"] = 1
        job = BridgeJob(id=secrets.token_hex(16), owner=session.owner, session_id=session.id, raw_request=raw,
                        request_summary=summary, previews=previews)
        return job

    def _enqueue(self, job: BridgeJob) -> None:
        self.jobs[job.id] = job
        session = self.sessions.get(job.session_id or "")
        if session is not None:
            session.jobs[job.id] = job
        self.queue.push(job)

    def _resolve_blobs(self, session: Session, value: Any, msg_id: Any, depth: int = 0) -> Any:
        if depth > 32:
            raise ProtocolError("invalid_params", "The request is nested too deeply.", id=msg_id)
        if isinstance(value, dict):
            if set(value) == {"blob"}:
                blob = value["blob"]
                if not isinstance(blob, str):
                    raise ProtocolError("invalid_params", "`{blob: id}` needs a string id.", id=msg_id)
                try:
                    return session.blobs.take(blob)[1]
                except ProtocolError as exc:
                    exc.id = msg_id
                    raise
            return {k: self._resolve_blobs(session, v, msg_id, depth + 1) for k, v in value.items()}
        if isinstance(value, list):
            return [self._resolve_blobs(session, v, msg_id, depth + 1) for v in value]
        return value

    async def validate_request(self, raw: dict[str, Any], *, msg_id: Any = None) -> dict[str, Any]:
        """Check a raw request (blobs already resolved to bytes) the way the engine will; return a summary."""
        for key in ("init_image", "mask"):
            value = raw.get(key)
            if isinstance(value, str) and not value.startswith("data:"):
                raise ProtocolError("invalid_request", f"`{key}` must be a blob reference {{\"blob\": id}} or a "
                                    "data: URL; server file paths and bare base64 are not accepted over the bridge.",
                                    id=msg_id, details={"field": key})
        if not self.allow_paths:
            for key in ("vae", "config"):
                if raw.get(key) is not None:
                    raise ProtocolError("invalid_request", f"`{key}` paths are not accepted from clients (start "
                                        "the server with --allow-paths to allow them).", id=msg_id,
                                        details={"field": key})
            model = raw.get("model")
            if model is not None and not self._model_allowed(model):
                raise ProtocolError("invalid_request", f"Unknown model {str(model)[:200]!r}; list_models gives "
                                    "the models this server offers.", id=msg_id, details={"field": "model"})
        max_px = self.limits["max_image_pixels"]

        def check() -> dict[str, Any]:
            import io

            from PIL import Image, UnidentifiedImageError

            for key, value in raw.items():
                if isinstance(value, (bytes, bytearray)):
                    try:
                        with Image.open(io.BytesIO(value)) as im:
                            w, h = im.size
                    except (UnidentifiedImageError, OSError, ValueError) as exc:
                        raise ProtocolError("invalid_request", f"`{key}` is not an image ({exc}).", id=msg_id,
                                            details={"field": key}) from None
                    if w * h > max_px:
                        raise ProtocolError("limit_exceeded", f"`{key}` is {w}x{h}; the limit is {max_px} pixels.",
                                            id=msg_id, retryable=False, details={"field": key})
            typed = self.engine.validate(dict(raw))
            data = _jsonable(typed.to_json_dict())
            return data

        from sdcore.errors import SdcoreError

        try:
            # in a worker thread: decoding images takes up to seconds, and even a plain request's validation
            # inline would hold up every other client's frames during a burst of submissions
            return await asyncio.to_thread(check)
        except SdcoreError as exc:
            raise ProtocolError("invalid_request", str(exc), id=msg_id,
                                details={"type": type(exc).__name__, "engine_code": exc.code}) from None

    def _model_allowed(self, model: Any) -> bool:
        if not isinstance(model, str):
            return False
        return any(model in (m["name"], m["path"]) for m in self.model_entries())

    def model_entries(self) -> list[dict[str, Any]]:
        from pathlib import Path

        entries = [dict(m, default=False) for m in self.engine.available_models()]
        default = self.engine.default_model
        if default:
            for m in entries:
                if m["path"] == default or m["name"] == default:
                    m["default"] = True
                    break
            else:
                p = Path(default)
                entries.insert(0, {"name": p.stem if p.suffix else p.name, "path": default, "default": True})
        return entries

    def _m_cancel(self, session: Session, msg: dict[str, Any]) -> dict[str, Any]:
        job = self._job_arg(session, msg, owned=True)
        state = job.state
        accepted = self._cancel(job)
        return {"job": job.id, "accepted": accepted, "state": state}

    def _m_subscribe(self, session: Session, msg: dict[str, Any]) -> None:
        job_id = msg["data"].get("job")
        job = self.jobs.get(job_id) if isinstance(job_id, str) else None
        if job is None:
            raise ProtocolError("unknown_job", f"No job {str(job_id)[:64]!r} on this server.", id=msg["id"])
        session.reply(msg["id"], job.status())
        if session.id not in job.watchers:
            session.watching.add(job.id)
            for item in job.history:
                session.deliver(job, item)
            if not job.done:
                job.watchers[session.id] = lambda j, item, s=session: s.deliver(j, item)

    def _m_unsubscribe(self, session: Session, msg: dict[str, Any]) -> dict[str, Any]:
        job = self._job_arg(session, msg, owned=False)
        if job.session_id == session.id:
            raise ProtocolError("invalid_params", "Owners cannot unsubscribe from their own jobs; cancel instead.",
                                id=msg["id"])
        job.watchers.pop(session.id, None)
        session.watching.discard(job.id)
        return {"job": job.id}

    def _m_job_status(self, session: Session, msg: dict[str, Any]) -> dict[str, Any]:
        job = self._job_arg(session, msg, owned=False)
        status = job.status()
        if job.state == "queued":
            status["position"] = self.queue.position(job)
        return status

    def _m_list_jobs(self, session: Session, msg: dict[str, Any]) -> dict[str, Any]:
        return {"items": [j.status() for j in session.jobs.values()]}

    def _m_list_models(self, session: Session, msg: dict[str, Any]) -> dict[str, Any]:
        return {"items": self.model_entries()}

    def _m_list_samplers(self, session: Session, msg: dict[str, Any]) -> dict[str, Any]:
        return {"items": _jsonable(self.engine.samplers.describe())}

    def _m_list_loras(self, session: Session, msg: dict[str, Any]) -> dict[str, Any]:
        return {"items": []}

    def _m_list_embeddings(self, session: Session, msg: dict[str, Any]) -> dict[str, Any]:
        return {"items": []}

    def _m_get_schema(self, session: Session, msg: dict[str, Any]) -> dict[str, Any]:
        return {"schema": self.request_schema()}

    def request_schema(self) -> dict[str, Any]:
        schema = self.engine.request_schema()
        image = {"anyOf": [
            {"type": "object", "properties": {"blob": {"type": "string"}}, "required": ["blob"],
             "additionalProperties": False, "description": "A blob uploaded earlier on this session."},
            {"type": "string", "pattern": "^data:", "description": "A small image as a data: URL."},
            {"type": "null"}], "default": None}
        for key in ("init_image", "mask"):
            if key in schema.get("properties", {}):
                schema["properties"][key] = {**image, "description": schema["properties"][key].get("description",
                                                                                                    key)}
        return schema

    def _m_engine_info(self, session: Session, msg: dict[str, Any]) -> dict[str, Any]:
        return _jsonable(self.engine.info())

    def _m_release(self, session: Session, msg: dict[str, Any]) -> dict[str, Any]:
        blob = msg["data"].get("blob")
        if not isinstance(blob, str):
            raise ProtocolError("invalid_params", "`data.blob` is required.", id=msg["id"])
        return {"blob": blob, "released": session.blobs.release(blob)}

    def _m_bye(self, session: Session, msg: dict[str, Any]) -> None:
        session.reply(msg["id"], {"session": session.id})
        ws = session.ws

        async def end() -> None:
            # let the writer flush the reply, then close
            for _ in range(100):
                if session.sent_upto >= session.seq or session.ws is not ws:
                    break
                await asyncio.sleep(0.01)
            self._end_session(session)
            if ws is not None:
                await ws.close(P.CLOSE_SESSION_ENDED, "bye")

        self._spawn(end())

    # -- jobs: dispatch and events ----------------------------------------------------------------------
    def submit_local(self, owner: str, raw: dict[str, Any], summary: dict[str, Any],
                     watcher: Callable[[BridgeJob, Any], None]) -> BridgeJob:
        """Queue a validated request for a non-websocket front end (the A1111 API); `watcher` gets events."""
        job = BridgeJob(id=secrets.token_hex(16), owner=owner, session_id=None, raw_request=raw,
                        request_summary=summary, previews=bool(raw.get("preview_every")))
        self.jobs[job.id] = job
        self.queue.push(job)
        job.watchers[owner] = watcher
        self._publish(job, JobMessage("queued", {"position": self.queue.position(job), "t": time.time()}))
        self._dispatch()
        return job

    def _publish(self, job: BridgeJob, item: JobMessage | tuple[dict[str, Any], bytes]) -> None:
        if isinstance(item, JobMessage):
            job.history.append(item)
        for watcher in list(job.watchers.values()):
            try:
                watcher(job, item)
            except Exception:  # noqa: BLE001 - a broken watcher must not stop the others
                log.exception("bridge watcher failed")

    def _finish(self, job: BridgeJob, item: JobMessage) -> None:
        if job.done:
            return
        job.state = {"result": "done", "error": "failed", "cancelled": "cancelled"}[item.type]
        job.finished = time.time()
        self._publish(job, item)
        job.latest_preview = None
        job.watchers.clear()
        job.raw_request = {}

    def _cancel(self, job: BridgeJob, replaced_by: str | None = None) -> bool:
        if job.done:
            return False
        if job.state == "queued" and self.queue.remove(job):
            data: dict[str, Any] = {"t": time.time()}
            if replaced_by:
                data["replaced_by"] = replaced_by
            self._finish(job, JobMessage("cancelled", data))
            return True
        job.cancel_requested = True
        if job.engine_job is not None:
            job.engine_job.cancel()
        return True

    def _dispatch(self) -> None:
        if self._dispatching or self.running is not None:
            return
        job = self.queue.pop()
        if job is None:
            return
        self._dispatching = True
        job.state = "dispatching"
        self._spawn(self._run(job))

    async def _run(self, job: BridgeJob) -> None:
        from sdcore.errors import SdcoreError

        loop = asyncio.get_running_loop()
        try:
            engine_job = await asyncio.to_thread(self.engine.submit, job.raw_request)
        except Exception as exc:  # noqa: BLE001 - becomes the job's error event
            error = exc.to_dict() if isinstance(exc, SdcoreError) else {
                "code": "internal_error", "type": type(exc).__name__, "message": str(exc)}
            self._dispatching = False
            self._finish(job, JobMessage("error", {**error, "t": time.time()}))
            self._dispatch()
            return
        self._dispatching = False
        self.running = job
        job.engine_job = engine_job
        job.state = "running" if not job.done else job.state
        if job.cancel_requested:
            engine_job.cancel()
        max_size = max((s.preview_max_size for s in self._watcher_sessions(job)), default=256)

        def listener(event: Event) -> None:  # engine worker thread (or this thread for replayed events)
            try:
                item = self._convert(job, event, max_size)
            except Exception as exc:  # noqa: BLE001 - never leave a job without its terminal event
                log.exception("bridge: converting an event failed")
                item = JobMessage("error", {"code": "internal_error", "type": type(exc).__name__,
                                            "message": f"the bridge could not encode the event: {exc}",
                                            "t": time.time()}) if event.terminal else None
            loop.call_soon_threadsafe(self._on_engine_item, job, event.seq, item)

        engine_job.subscribe(listener, replay=True)

    def _watcher_sessions(self, job: BridgeJob) -> list[Session]:
        return [s for sid in job.watchers if (s := self.sessions.get(sid)) is not None]

    def _convert(self, job: BridgeJob, event: Event, preview_size: int) -> Any:
        from sdcore.jobs import (
            CancelledEvent,
            ErrorEvent,
            PreviewEvent,
            ProgressEvent,
            ResultEvent,
            StartedEvent,
        )

        now = time.time()
        if isinstance(event, StartedEvent):
            return JobMessage("started", {"t": now})
        if isinstance(event, ProgressEvent):
            return JobMessage("progress", {"step": event.step, "total": event.total, "batch": event.batch,
                                           "fraction": round(event.fraction, 4), "t": now})
        if isinstance(event, PreviewEvent):
            if not job.previews or event.image is None:
                return None
            import io

            image = event.image.convert("RGB")
            image.thumbnail((preview_size, preview_size))
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=80)
            header = {"type": "preview", "job": job.id, "step": event.step, "mime": "image/jpeg",
                      "width": image.width, "height": image.height, "t": now}
            return (header, buf.getvalue())
        if isinstance(event, ResultEvent):
            from sdcore.infotext import png_bytes

            result = event.result
            assert result is not None
            images, blobs = [], []
            for i, image in enumerate(result.images):
                data = png_bytes(image, result.infotexts[i])
                blob = f"{job.id}.{i}"
                blobs.append((blob, "image/png", data))
                images.append({"index": i, "blob": blob, "mime": "image/png", "size": len(data),
                               "width": image.width, "height": image.height, "seed": result.seeds[i],
                               "subseed": result.subseeds[i], "infotext": result.infotexts[i]})
            request = _jsonable(result.request.to_json_dict())
            return JobMessage("result", {"images": images, "seeds": list(result.seeds),
                                         "infotexts": list(result.infotexts), "model": result.model_name,
                                         "model_hash": result.model_hash, "request": request, "t": time.time()},
                              blobs)
        if isinstance(event, ErrorEvent):
            return JobMessage("error", {**event.error, "t": now})
        if isinstance(event, CancelledEvent):
            return JobMessage("cancelled", {"t": now})
        return None

    def _on_engine_item(self, job: BridgeJob, seq: int, item: Any) -> None:
        # replayed and live events can be scheduled out of order; put them back in the engine's order
        job.engine_pending[seq] = item
        while job.engine_next in job.engine_pending:
            next_item = job.engine_pending.pop(job.engine_next)
            job.engine_next += 1
            if next_item is not None:
                self._on_engine_item_ordered(job, next_item)

    def _on_engine_item_ordered(self, job: BridgeJob, item: Any) -> None:
        if isinstance(item, JobMessage) and item.terminal:
            if self.running is job:
                self.running = None
            self._finish(job, item)
            self._release_engine_job(job)
            self._dispatch()
            return
        if job.done:
            return
        if isinstance(item, JobMessage):
            if item.type == "progress":
                job.progress = (item.data["step"], item.data["total"])
            if item.type == "started":
                job.state = "running"
        else:
            job.latest_preview = item
        self._publish(job, item)

    def _release_engine_job(self, job: BridgeJob) -> None:
        """The bridge keeps what it needs of a finished job (PNG bytes, for `result_ttl_s`) itself, so the
        Engine need not hold the job and its images any longer."""
        engine_job = job.engine_job
        if engine_job is not None:
            self.engine.forget(engine_job.id)
        job.engine_job = None

    # -- misc -------------------------------------------------------------------------------------------
    @staticmethod
    def _version() -> str:
        from sdcore import __version__

        return __version__

