"""The network side: a thread running an asyncio loop with the sdcore bridge client.

Krita's API must only be used from Qt's thread, so the worker never touches it: the Qt side calls the
methods below (thread-safe) and drains `events` (a queue) from a QTimer. Events are tuples:
("status", text), ("connected", welcome), ("job", job_id, tag), ("event", job_id, type, data),
("result", job_id, [(png bytes, seed, infotext), ...]), ("failed", job_id or None, message).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any


def _client_module() -> Any:
    try:
        from sdcore_bridges import client
    except ImportError as exc:  # pragma: no cover - shown in the docker
        raise RuntimeError("The sdcore bridge client is missing: run bridges/krita/install.py, which vendors "
                           f"websockets and the client into the plugin ({exc}).") from None
    return client


class BridgeWorker:
    def __init__(self) -> None:
        self.events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.loop = asyncio.new_event_loop()
        self.client: Any = None
        self._thread = threading.Thread(target=self._run, name="sdcore-krita-network", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def _call(self, coro: Any) -> None:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        future.add_done_callback(self._report)

    def _report(self, future: Any) -> None:
        exc = future.exception()
        if exc is not None:
            self.events.put(("failed", None, str(exc)))

    # -- called from Qt's thread ----------------------------------------------------------------------
    def connect(self, url: str, token: str | None) -> None:
        self._call(self._connect(url, token or None))

    def submit(self, request: dict[str, Any], images: dict[str, bytes], tag: Any = None) -> None:
        self._call(self._submit(request, images, tag))

    def cancel(self, job_id: str) -> None:
        self._call(self._cancel(job_id))

    def list_models(self) -> None:
        self._call(self._list_models())

    def close(self) -> None:
        async def stop() -> None:
            if self.client is not None:
                await self.client.close()

        try:
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)

    # -- in the worker's loop ---------------------------------------------------------------------------
    async def _connect(self, url: str, token: str | None) -> None:
        client_module = _client_module()
        if self.client is not None:
            await self.client.close()
        self.client = client_module.BridgeClient(url, token=token, client_name="sdcore-krita", previews=False)
        self.events.put(("status", f"Connecting to {url}…"))
        try:
            welcome = await self.client.connect()
        except client_module.BridgeError as exc:
            self.client = None
            self.events.put(("failed", None, f"Cannot connect: {exc.message}"))
            return
        self.events.put(("connected", welcome))

    async def _ensure(self) -> Any:
        if self.client is None:
            raise RuntimeError("Not connected: press Connect first.")
        return self.client

    async def _submit(self, request: dict[str, Any], images: dict[str, bytes], tag: Any) -> None:
        client_module = _client_module()
        client = await self._ensure()
        try:
            job = await client.submit(request, images=images)
        except client_module.BridgeError as exc:
            self.events.put(("failed", None, exc.message))
            return
        self.events.put(("job", job.id, tag))
        async for event in job.events():
            if event.type == "result":
                images_out = [(img.data, img.seed, img.infotext) for img in event.images or []]
                self.events.put(("result", job.id, images_out))
            elif event.type == "error":
                self.events.put(("failed", job.id, str(event.data.get("message", "the job failed"))))
            else:
                self.events.put(("event", job.id, event.type, dict(event.data)))

    async def _cancel(self, job_id: str) -> None:
        client = await self._ensure()
        await client.cancel(job_id)

    async def _list_models(self) -> None:
        client = await self._ensure()
        self.events.put(("models", await client.list_models()))
