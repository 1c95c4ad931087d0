"""Switching LoRAs between jobs versus reloading the model with the LoRA, on the tiny SD 1.x model.

    .venv/bin/python benchmarks/bench_lora.py [--runs 10] [--rank 8] [--threads 1]

Two kohya LoRAs (every Linear and Conv2d of the UNet and text encoder, LoCon-style, per-module alpha) are
written next to a tiny single-file checkpoint. Timed per "job", median of `--runs`:

1. switch: what the plugin does around a batch: resolve the next LoRA's keys against the loaded model, patch
   the weights, and restore them afterwards (the parsed files are cached, as between real jobs);
2. reload: drop the model from the engine's cache, load the checkpoint again and patch the LoRA in.

Goal: switch at least 10x faster than reload. The denoising itself is the same in both and is left out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_lora(path: Path, model, rank: int, seed: int) -> None:
    import torch
    from safetensors.torch import save_file
    from sdcore_plugins.lora.patch import build_index

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, target in build_index(model).items():
        if not key.startswith(("lora_unet_input", "lora_unet_output", "lora_unet_middle", "lora_te_")):
            continue
        weight = target.module.weight
        r = min(rank, weight.shape[0], weight[0].numel())
        state[f"{key}.lora_down.weight"] = torch.randn(r, *weight.shape[1:], generator=gen) * 0.01
        state[f"{key}.lora_up.weight"] = torch.randn(weight.shape[0], r, *([1, 1] if weight.dim() == 4 else []),
                                                     generator=gen) * 0.01
        state[f"{key}.alpha"] = torch.tensor(float(r) / 2)
    save_file(state, str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (the tiny model's ops take microseconds, so on a shared machine "
                             "thread wake-ups would dominate both timings)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    from sdcore_plugins.lora import patch
    from sdcore_plugins.lora.library import load_lora

    from sdcore import Engine
    from sdcore.testing.models import make_tiny_model

    work = Path(tempfile.mkdtemp(prefix="sdcore-bench-lora-"))
    checkpoint = make_tiny_model(work, family="sd1", fmt="single_file")
    engine = Engine(device="cpu", default_model=checkpoint)
    model = engine.load_model()
    loras = [work / "a.safetensors", work / "b.safetensors"]
    for i, path in enumerate(loras):
        write_lora(path, model, args.rank, seed=i)
    files = [load_lora(p) for p in loras]
    print(f"LoRA: {len(files[0].modules)} modules, rank {args.rank}, {loras[0].stat().st_size / 1e6:.1f} MB")

    def switch(i: int) -> None:
        lora = load_lora(loras[i % 2])
        patch.apply(model, [patch.resolve(model, lora, 0.8, 0.8)])
        patch.restore(model)

    def reload(i: int) -> None:
        engine.models.clear()
        fresh = engine.load_model()
        patch.apply(fresh, [patch.resolve(fresh, load_lora(loras[i % 2]), 0.8, 0.8)])

    timings: dict[str, list[float]] = {"switch": [], "reload": []}
    for i in range(args.runs):
        for name, fn in (("switch", switch), ("reload", reload)):
            start = time.perf_counter()
            fn(i)
            timings[name].append(time.perf_counter() - start)
    s, r = statistics.median(timings["switch"]), statistics.median(timings["reload"])
    print(f"switch LoRA:            {s * 1000:8.1f} ms (median of {args.runs})")
    print(f"reload model with LoRA: {r * 1000:8.1f} ms")
    print(f"speed-up: {r / s:.1f}x (goal >= 10x)")
    engine.close()


if __name__ == "__main__":
    main()
