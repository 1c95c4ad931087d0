"""Jobs and their events.

A `Job` is what `Engine.submit` returns. Its events arrive in order and are kept, so a consumer that starts
late (or a bridge client that reconnects) still sees every event from the first. Exactly one terminal event
ends every job: `ResultEvent`, `ErrorEvent` or `CancelledEvent`.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from .errors import JobCancelled, JobFailed, SdcoreError

if TYPE_CHECKING:
    from PIL import Image

    from .requests import GenerationRequest
    from .results import GenerationResult


class JobState(str, Enum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"


@dataclass(frozen=True)
class Event:
    """Base of every job event. `seq` counts from 0 within a job."""

    job_id: str
    seq: int
    type: str = field(init=False, default="event")

    @property
    def terminal(self) -> bool:
        return False

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "job": self.job_id, "seq": self.seq}


@dataclass(frozen=True)
class QueuedEvent(Event):
    position: int = 0
    type: str = field(init=False, default="queued")

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "position": self.position}


@dataclass(frozen=True)
class StartedEvent(Event):
    type: str = field(init=False, default="started")


@dataclass(frozen=True)
class ProgressEvent(Event):
    """`step` of `total` UNet evaluations done, counted over the whole job (all batches, all passes)."""

    step: int = 0
    total: int = 0
    batch: int = 0
    type: str = field(init=False, default="progress")

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "step": self.step, "total": self.total, "batch": self.batch}


@dataclass(frozen=True)
class PreviewEvent(Event):
    """A cheap approximation of the current latents (no VAE), for live display."""

    step: int = 0
    image: Image.Image | None = None
    type: str = field(init=False, default="preview")

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "step": self.step}


@dataclass(frozen=True)
class ResultEvent(Event):
    result: GenerationResult | None = None
    type: str = field(init=False, default="result")

    @property
    def terminal(self) -> bool:
        return True

    def to_dict(self) -> dict[str, Any]:
        assert self.result is not None
        return {**super().to_dict(), "seeds": self.result.seeds, "infotexts": self.result.infotexts}


@dataclass(frozen=True)
class ErrorEvent(Event):
    error: dict[str, str] = field(default_factory=dict)
    type: str = field(init=False, default="error")

    @property
    def terminal(self) -> bool:
        return True

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "error": self.error}


@dataclass(frozen=True)
class CancelledEvent(Event):
    type: str = field(init=False, default="cancelled")

    @property
    def terminal(self) -> bool:
        return True


Listener = Callable[[Event], None]


class Job:
    """A submitted request: its events, its cancellation and its result."""

    def __init__(self, request: GenerationRequest, *, job_id: str | None = None) -> None:
        self.id = job_id or uuid.uuid4().hex
        self.request = request
        self.state = JobState.queued
        self.created = time.time()
        self._events: list[Event] = []
        self._cond = threading.Condition()
        self._cancel = threading.Event()
        self._listeners: list[Listener] = []
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None
        # set by the engine so cancelling a queued job can remove it from the queue at once
        self._on_cancel: Callable[[Job], None] | None = None

    def __repr__(self) -> str:
        return f"<Job {self.id[:8]} {self.state.value}>"

    # -- cancellation ---------------------------------------------------------------------------------
    def cancel(self) -> bool:
        """Ask the job to stop. A queued job ends at once; a running one stops before its next step and
        decodes nothing. Returns False if the job had already ended."""
        with self._cond:
            if self.done:
                return False
            self._cancel.set()
        if self._on_cancel is not None:
            self._on_cancel(self)
        return True

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def raise_if_cancelled(self) -> None:
        if self._cancel.is_set():
            raise JobCancelled(f"Job {self.id} was cancelled")

    # -- events ---------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.state in (JobState.done, JobState.failed, JobState.cancelled)

    def emit(self, make: Callable[[int], Event]) -> Event | None:
        """Append the event built by `make(seq)`; ignored once the job has ended (one terminal event only)."""
        with self._cond:
            if self.done:
                return None
            event = make(len(self._events))
            self._events.append(event)
            if isinstance(event, ResultEvent):
                self.state, self._result = JobState.done, event.result
            elif isinstance(event, ErrorEvent):
                self.state = JobState.failed
            elif isinstance(event, CancelledEvent):
                self.state = JobState.cancelled
            elif isinstance(event, StartedEvent):
                self.state = JobState.running
            listeners = list(self._listeners)
            self._cond.notify_all()
        for listener in listeners:
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - a broken listener must not break the job
                pass
        return event

    def fail(self, error: BaseException) -> None:
        self._error = error
        payload = error.to_dict() if isinstance(error, SdcoreError) else {
            "code": "internal_error", "type": type(error).__name__, "message": str(error) or type(error).__name__,
        }
        self.emit(lambda seq: ErrorEvent(self.id, seq, error=payload))

    def subscribe(self, listener: Listener, *, replay: bool = True) -> Callable[[], None]:
        """Call `listener(event)` for every event (past ones first when `replay`). Returns an unsubscribe."""
        with self._cond:
            past = list(self._events) if replay else []
            self._listeners.append(listener)
        for event in past:
            listener(event)

        def unsubscribe() -> None:
            with self._cond:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    @property
    def history(self) -> list[Event]:
        with self._cond:
            return list(self._events)

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Every event in order, blocking for new ones, ending after the terminal event."""
        index = 0
        while True:
            with self._cond:
                while index >= len(self._events):
                    if not self._cond.wait(timeout):
                        raise TimeoutError(f"No event from job {self.id} within {timeout} s")
                event = self._events[index]
            index += 1
            yield event
            if event.terminal:
                return

    async def aevents(self) -> AsyncIterator[Event]:
        """The same events for asyncio code, without blocking the event loop."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        unsubscribe = self.subscribe(lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
        try:
            while True:
                event = await queue.get()
                yield event
                if event.terminal:
                    return
        finally:
            unsubscribe()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self.aevents()

    # -- result ---------------------------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.done, timeout)

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Block until the job ends; return its result or raise its error (`JobCancelled` if cancelled)."""
        if not self.wait(timeout):
            raise TimeoutError(f"Job {self.id} did not finish within {timeout} s")
        if self.state is JobState.done:
            assert self._result is not None
            return self._result
        if self.state is JobState.cancelled:
            raise JobCancelled(f"Job {self.id} was cancelled")
        error = self._error
        if isinstance(error, SdcoreError):
            raise error
        raise JobFailed(f"Job {self.id} failed: {type(error).__name__}: {error}") from error

    async def aresult(self) -> GenerationResult:
        async for _ in self.aevents():
            pass
        return self.result(timeout=0)
