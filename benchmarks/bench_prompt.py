"""Prompt encoding time of the A1111 prompt language: a 300-token weighted prompt, cold and cached.

    .venv/bin/python benchmarks/bench_prompt.py [--runs 20] [--family sd1 sdxl] [--steps 20] [--threads 1]

For each tiny model (random weights, real tokenizer and layer layout) it times `parse_pair` + `encode_parsed`,
the work `encode_prompts` does per job:

- cold: every cache emptied before every run (parsing, tokenizing, 5 chunks through the text encoder(s),
  emphasis, concatenation);
- cached: the same prompt again (what a second job with the same prompt, or a seed sweep, pays);
- edited: the cache warm, but the last chunk of the prompt changed (only that chunk is encoded again).

Prints the median of each in milliseconds and the cold/cached ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ("masterpiece", "portrait", "castle", "forest", "river", "golden", "light", "detailed", "sky", "cloud")


def weighted_prompt(tokens: int, tail: str = "") -> str:
    """A prompt of at least `tokens` CLIP tokens, with emphasis, de-emphasis and commas, like real prompts."""
    from sdcore_plugins.prompt_language import count_tokens

    parts: list[str] = []
    i = 0
    while sum(count_tokens(", ".join(parts))) < tokens:
        word = WORDS[i % len(WORDS)]
        parts.append({0: f"({word}:1.2)", 1: f"[{word}]", 2: f"(({word}))", 3: word}[i % 4])
        i += 1
    return ", ".join(parts) + tail


def bench(family: str, prompt: str, edited: list[str], runs: int, steps: int) -> str:
    import torch
    from sdcore_plugins.prompt_language.encoder import _parse_pair, encode_parsed, model_state, parse_pair

    from sdcore.testing.models import build_tiny_model

    model = build_tiny_model(family)
    state = model_state(model)

    def encode(text: str) -> None:
        positive, negative = parse_pair(text, "blurry, lowres", steps)
        encode_parsed(model, positive, negative)

    def cold() -> None:
        _parse_pair.cache_clear()
        state["_cache"].clear()
        state.pop("_tokens", None)
        model_state(model)
        encode(prompt)

    def timed(fn, *fn_args) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            fn(*fn_args)
        return (time.perf_counter() - start) * 1000

    cold()  # warm up torch and the tokenizer
    cold_ms = [timed(cold) for _ in range(runs)]
    cached_ms = [timed(encode, prompt) for _ in range(runs)]
    edited_ms = []
    for text in edited:
        encode(prompt)
        edited_ms.append(timed(encode, text))
    cold_med, cached_med = statistics.median(cold_ms), statistics.median(cached_ms)
    return (
        f"{family:5s} cold {cold_med:8.2f} ms   cached {cached_med:7.3f} ms   "
        f"last chunk edited {statistics.median(edited_ms):7.2f} ms   cold/cached {cold_med / cached_med:7.1f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--family", nargs="+", default=["sd1", "sdxl"], choices=["sd1", "sdxl"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on a shared CPU)")
    args = parser.parse_args()

    import torch
    from sdcore_plugins.prompt_language import count_tokens

    torch.set_num_threads(max(1, args.threads))
    prompt = weighted_prompt(300)
    edited = [weighted_prompt(300, tail=f", variation {i}") for i in range(args.runs)]
    counts = count_tokens(prompt)
    print(f"prompt: {sum(counts)} tokens in {len(counts)} chunks {counts}; negative: 'blurry, lowres'")
    for family in args.family:
        print(bench(family, prompt, edited, args.runs, args.steps))


if __name__ == "__main__":
    main()
