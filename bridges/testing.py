"""Helpers for testing front ends against a real bridge server (tests, benchmarks, editor extensions).

    engine = shared_engine(tiny_sd1_model)           # one Engine per model path per process
    with serve_in_thread(engine, token="t") as server:
        ... server.url ...                           # ws://127.0.0.1:PORT (an ephemeral port)
"""

from __future__ import annotations

import atexit
import functools
from typing import Any

from sdcore.hookspecs import hookimpl


@functools.cache
def shared_engine(model: str) -> Any:
    """An Engine on the CPU whose default model is `model`, shared by every test module of the process."""
    from sdcore import Engine

    engine = Engine(device="cpu", default_model=str(model))
    atexit.register(engine.close, wait=False)
    return engine


def serve_in_thread(engine: Any, **kwargs: Any) -> Any:
    """Start a `BridgeServer` on 127.0.0.1 and an ephemeral port in a background thread; use as a context manager."""
    from .server import BridgeServer

    kwargs.setdefault("host", "127.0.0.1")
    kwargs.setdefault("port", 0)
    return BridgeServer(engine, **kwargs).start_in_thread()


class Gate:
    """A test plugin: a job whose prompt starts with "gate" waits in its first denoising step until `open()`;
    one whose prompt starts with "fail" raises in it. Register it once with `gate_for(engine)`."""

    def __init__(self) -> None:
        import threading

        self._open = threading.Event()
        self.entered = threading.Event()

    def close(self) -> None:
        self._open.clear()
        self.entered.clear()

    def open(self) -> None:
        self._open.set()

    def wait_entered(self, timeout: float = 30) -> bool:
        return self.entered.wait(timeout)

    @hookimpl
    def before_denoise_step(self, state: Any) -> None:
        prompt = state.context.request.prompt
        if prompt.startswith("gate"):
            self.entered.set()
            self._open.wait(30)
        elif prompt.startswith("fail"):
            raise RuntimeError("deliberate failure for a test")


def gate_for(engine: Any) -> Gate:
    """The `Gate` registered on `engine` (registered on first use)."""
    gate = getattr(engine, "_bridge_test_gate", None)
    if gate is None:
        gate = Gate()
        engine.register(gate, name="sdcore-bridge-test-gate")
        engine._bridge_test_gate = gate
    return gate
