"""sdcore's engine against plain diffusers on the same work, in the same process, interleaved.

    .venv/bin/python benchmarks/bench_core.py [--runs 15] [--steps 10] [--size 64]

Prints the median time of each and the ratio sdcore / diffusers for
1. one txt2img generation (same tiny SD 1.x model, prompt, seed, sampler and steps; goal <= 1.05), and
2. loading a single-file checkpoint (sdcore's loader vs `StableDiffusionPipeline.from_single_file(config=...)`;
   goal <= 1.0).
Both sides produce the same image; the script checks that before timing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()

    import numpy as np
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from sdcore import Engine, GenerationRequest
    from sdcore.testing.models import make_tiny_model

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    work = Path(tempfile.mkdtemp(prefix="sdcore-bench-"))
    single = make_tiny_model(work, family="sd1", fmt="single_file")
    folder = make_tiny_model(work, family="sd1", fmt="diffusers")
    prompt, seed = "a red circle at the top left on a white background", 1234

    engine = Engine(device="cpu")
    request = GenerationRequest(prompt=prompt, model=str(single), steps=args.steps, width=args.size,
                                height=args.size, sampler="Euler", seed=seed, cfg_scale=7.0)
    pipe = StableDiffusionPipeline.from_single_file(str(single), config=str(folder), safety_checker=None)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    latent = args.size // pipe.vae_scale_factor

    def run_sdcore() -> np.ndarray:
        return np.asarray(engine.generate(request).images[0])

    def run_diffusers() -> np.ndarray:
        noise = torch.randn((1, 4, latent, latent), generator=torch.Generator("cpu").manual_seed(seed))
        image = pipe(prompt, num_inference_steps=args.steps, guidance_scale=7.0, height=args.size,
                     width=args.size, latents=noise).images[0]
        return np.asarray(image)

    a, b = run_sdcore(), run_diffusers()
    print(f"same image: max |difference| = {int(np.abs(a.astype(int) - b.astype(int)).max())} (of 255)")

    gen = interleaved({"sdcore": run_sdcore, "diffusers": run_diffusers}, args.runs)
    report("txt2img", gen, goal=1.05)

    def load_sdcore() -> None:
        engine.models.clear()
        engine.load_model(str(single))

    def load_diffusers() -> None:
        StableDiffusionPipeline.from_single_file(str(single), config=str(folder), safety_checker=None)

    load = interleaved({"sdcore": load_sdcore, "diffusers": load_diffusers}, args.runs)
    report("single-file load", load, goal=1.0)
    engine.close()


def interleaved(funcs: dict, runs: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in funcs}
    for func in funcs.values():  # warm-up
        func()
    for _ in range(runs):
        for name, func in funcs.items():
            start = time.perf_counter()
            func()
            times[name].append(time.perf_counter() - start)
    return times


def report(label: str, times: dict[str, list[float]], goal: float) -> None:
    ours, theirs = statistics.median(times["sdcore"]), statistics.median(times["diffusers"])
    ratio = ours / theirs
    verdict = "meets" if ratio <= goal else "misses"
    print(f"{label}: sdcore {ours * 1000:.1f} ms, diffusers {theirs * 1000:.1f} ms (medians of "
          f"{len(times['sdcore'])}); ratio {ratio:.3f} ({verdict} the goal <= {goal})")


if __name__ == "__main__":
    main()
