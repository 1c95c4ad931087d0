"""The bridge's event latency and its image transport, on loopback, with the real Engine on a tiny model.

    .venv/bin/python benchmarks/bench_bridge.py [--model PATH] [--size 4096] [--skip-roundtrip]

1. Event latency: the time from the moment the engine emits an event (the server stamps `data.t` in the
   engine's worker thread) to the moment a client's asyncio loop has decoded it, for every job event, with 1
   client and with 50 concurrent clients. The clients run in a separate process, so they do not share the
   server's GIL. Goal: p99 < 5 ms. Application-level ping round trips are printed too.
2. A 4096x4096 image round trip through the same img2img job (a benchmark plugin replaces the denoising with
   "return the init image", so the engine's work is identical and tiny): up as chunked binary frames and back
   as a lossless PNG in binary frames over the websocket, versus up and back as base64 JSON through the
   A1111 API (`/sdapi/v1/img2img`). Both sides decode the returned PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from sdcore.hookspecs import hookimpl

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


# --- clients (run in a child process) ----------------------------------------------------------------------


def client_process(url: str, clients: int, jobs: int, steps: int, out: Any) -> None:
    from sdcore_bridges.client import BridgeClient

    async def one(i: int) -> tuple[list[tuple[str, float]], list[float]]:
        latencies: list[tuple[str, float]] = []
        c = BridgeClient(url, ping_interval=0)
        c.on_event.append(lambda job, event: latencies.append((event.type, time.time() - event.data["t"]))
                          if "t" in event.data else None)
        await c.connect()
        pings = [await c.ping() for _ in range(5)]
        for j in range(jobs):
            job = await c.submit({"prompt": f"bench {i}", "steps": steps, "width": 64, "height": 64,
                                  "sampler": "Euler", "seed": i * 100 + j})
            await job.result(600)
        await c.close()
        return latencies, pings

    async def main() -> None:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(clients)))
        wall = time.perf_counter() - start
        lat = [x for r in results for x in r[0]]
        pings = [x for r in results for x in r[1]]
        out.put({"latencies": lat, "pings": pings, "wall": wall})

    asyncio.run(main())


def latency(url: str, clients: int, jobs: int, steps: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=client_process, args=(url, clients, jobs, steps, queue))
    proc.start()
    data = queue.get(timeout=900)
    proc.join(60)
    return data


# --- the 4096x4096 round trip ------------------------------------------------------------------------------


class Identity:
    """Benchmark plugin: img2img jobs whose prompt is "identity" return their init image untouched."""

    @hookimpl(tryfirst=True)
    def run_generation(self, context: Any) -> Any:
        if context.request.prompt != "identity":
            return None
        from sdcore.generation import GenerationOutput
        from sdcore.images import load_image, to_rgb

        return GenerationOutput(images=[to_rgb(load_image(context.request.init_image))])


def test_image(size: int) -> bytes:
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rng = np.random.default_rng(0)
    rgb = np.stack([x, y, (x + y) / 2], axis=-1) * 200 + rng.normal(0, 6, (size, size, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


async def roundtrip_bridge(url: str, png: bytes, size: int) -> tuple[float, int]:
    from PIL import Image
    from sdcore_bridges.client import BridgeClient

    async with BridgeClient(url, ping_interval=0) as c:
        start = time.perf_counter()
        result = await c.generate({"prompt": "identity", "steps": 1, "width": size, "height": size,
                                   "sampler": "Euler", "seed": 1, "denoising_strength": 0.5},
                                  images={"init_image": png}, timeout=600)
        data = result.images[0].data
        assert data is not None
        Image.open(io.BytesIO(data)).load()
        return time.perf_counter() - start, len(png) + len(data)


async def upload_bridge(url: str, png: bytes) -> float:
    from sdcore_bridges.client import BridgeClient

    async with BridgeClient(url, ping_interval=0) as c:
        start = time.perf_counter()
        blob = await c.upload(png)
        assert (await c.request("release", {"blob": blob}))["released"]  # the server holds all of it
        return time.perf_counter() - start


def upload_a1111(http_url: str, png: bytes) -> float:
    import requests

    start = time.perf_counter()
    body = json.dumps({"image": base64.b64encode(png).decode()})
    response = requests.post(f"{http_url}/sdapi/v1/png-info", data=body, timeout=600)
    response.raise_for_status()
    return time.perf_counter() - start


def roundtrip_a1111(http_url: str, png: bytes, size: int) -> tuple[float, int]:
    import requests
    from PIL import Image

    start = time.perf_counter()
    body = json.dumps({"prompt": "identity", "init_images": [base64.b64encode(png).decode()], "steps": 1,
                       "width": size, "height": size, "sampler_name": "Euler", "seed": 1,
                       "denoising_strength": 0.5})
    response = requests.post(f"{http_url}/sdapi/v1/img2img", data=body,
                             headers={"Content-Type": "application/json"}, timeout=600)
    response.raise_for_status()
    payload = response.json()
    Image.open(io.BytesIO(base64.b64decode(payload["images"][0]))).load()
    return time.perf_counter() - start, len(body) + len(response.content)


# --- main ------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a tiny SD 1.x checkpoint (default: build one)")
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20, help="steps per job for the 1-client latency run")
    parser.add_argument("--skip-roundtrip", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch threads of the engine (1 leaves a core to the server's loop and the clients)")
    parser.add_argument("--switch-interval-ms", type=float, default=1.0,
                        help="the server process's GIL switch interval (`sdcore serve` uses 1 ms; Python's is 5)")
    args = parser.parse_args()
    import sys

    import torch

    torch.set_num_threads(args.torch_threads)
    sys.setswitchinterval(args.switch_interval_ms / 1000)

    from sdcore_bridges.server import BridgeServer

    from sdcore import Engine
    from sdcore.testing.models import make_tiny_model

    model = args.model or str(make_tiny_model(Path(tempfile.mkdtemp(prefix="sdcore-bench-")), family="sd1"))
    engine = Engine(device="cpu", default_model=model, plugins=[Identity()])
    engine.generate({"prompt": "warm up", "steps": 1, "width": 64, "height": 64, "sampler": "Euler"})
    handle = BridgeServer(engine, port=0, a1111_port=0).start_in_thread()
    print(f"server {handle.url}, A1111 API {handle.http_url}, model {Path(model).name}, cpu x{os.cpu_count()}, "
          f"torch threads {args.torch_threads}, GIL switch interval {args.switch_interval_ms} ms, "
          f"load average {os.getloadavg()[0]:.1f}")
    try:
        print("\n1. event latency (engine emits -> client decoded), loopback, clients in another process")
        for clients, jobs, steps in ((1, 2, args.steps), (50, 1, 2)) if not args.skip_latency else ():
            data = latency(handle.url, clients, jobs, steps)
            lat = [x * 1000 for _, x in data["latencies"]]
            by_type: dict[str, list[float]] = {}
            for kind, x in data["latencies"]:
                by_type.setdefault(kind, []).append(x * 1000)
            ping = [x * 1000 for x in data["pings"]]
            print(f"  {clients:>2} client(s), {clients * jobs} jobs, {len(lat)} events: "
                  f"p50 {pct(lat, 0.5):.2f} ms, p99 {pct(lat, 0.99):.2f} ms, max {max(lat):.2f} ms "
                  f"(goal p99 < 5 ms: {'met' if pct(lat, 0.99) < 5 else 'NOT met'}); "
                  f"ping rtt p50 {pct(ping, 0.5):.2f} ms, p99 {pct(ping, 0.99):.2f} ms; wall {data['wall']:.1f} s")
            print("     p50/p99 by event: " + ", ".join(f"{k} {pct(v, 0.5):.2f}/{pct(v, 0.99):.2f} ms (n={len(v)})"
                                                     for k, v in by_type.items()))
        if not args.skip_roundtrip:
            size = args.size
            png = test_image(size)
            print(f"\n2. {size}x{size} image round trip (PNG {len(png) / 2**20:.1f} MiB up, lossless PNG back)")
            asyncio.run(roundtrip_bridge(handle.url, test_image(256), 256))  # warm both paths
            roundtrip_a1111(handle.http_url, test_image(256), 256)
            times: dict[str, list[float]] = {"bridge": [], "a1111": []}
            wire: dict[str, int] = {}
            for _ in range(2):
                t, n = asyncio.run(roundtrip_bridge(handle.url, png, size))
                times["bridge"].append(t)
                wire["bridge"] = n
                t, n = roundtrip_a1111(handle.http_url, png, size)
                times["a1111"].append(t)
                wire["a1111"] = n
            ups = {"bridge": [asyncio.run(upload_bridge(handle.url, png)) for _ in range(3)],
                   "a1111": [upload_a1111(handle.http_url, png) for _ in range(3)]}
            b, a = statistics.median(times["bridge"]), statistics.median(times["a1111"])
            print(f"  websocket binary frames: {b:.2f} s (best {min(times['bridge']):.2f} s), "
                  f"{wire['bridge'] / 2**20:.1f} MiB on the wire")
            print(f"  A1111 base64 JSON:       {a:.2f} s (best {min(times['a1111']):.2f} s), "
                  f"{wire['a1111'] / 2**20:.1f} MiB on the wire")
            print(f"  base64 JSON / binary: {a / b:.2f}x time, {wire['a1111'] / wire['bridge']:.2f}x bytes "
                  "(both include the same server-side PNG decode and lossless PNG encode)")
            ub, ua = statistics.median(ups["bridge"]), statistics.median(ups["a1111"])
            print(f"  upload only (transport, no pixel decoding): binary chunks {ub * 1000:.0f} ms "
                  f"(upload + release reply), base64 JSON {ua * 1000:.0f} ms (POST /sdapi/v1/png-info): "
                  f"{ua / ub:.2f}x")
    finally:
        handle.stop()
        engine.close()


if __name__ == "__main__":
    main()
