"""Did the picture come out as asked? Pixel analysis of generated shape images.

For one image (`analyze`):

- background: the median colour of the border of the top half and of the bottom half, each named by the nearest
  background colour ("white", or "white and black" for a two-colour background: top and bottom);
- foreground: the pixels far from the background colour of their half, largest connected blob only;
- colour: the median colour of the blob's inner pixels, named by the nearest palette colour;
- position: the cell of the 3×3 grid that holds the blob's centroid;
- shape (analysis by synthesis): the blob's coverage map (each pixel's position between the background colour
  and the measured colour) is compared with each of the four shapes drawn with the same area and centroid, both
  averaged over 4×4 blocks (the VAE's resolution, so blur and blockiness do not decide); the closest wins;
- size: the radius that gives the winning shape the blob's area, against the three sizes.

`evaluate` generates a grid of prompts × seeds through the real `sdcore.Engine`, optionally with a LoRA merged
into the model, and returns the accuracy per attribute; `run_evaluate_command` is `sdcore demo evaluate`.
"""

from __future__ import annotations

import functools
import json
import math
import random
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .data import (
    BACKGROUNDS,
    COLOURS,
    EXTRA_BACKGROUNDS,
    POSITION_NAMES,
    SHAPES,
    SIZE,
    SIZES,
    Scene,
    caption,
    shape_polygon,
)

POOL = 4  # the VAE's downsampling: shapes are compared at that resolution
FOREGROUND_DISTANCE = 80.0  # RGB distance from the background that makes a pixel foreground
MIN_BLOB = 6  # pixels; fewer means "no shape drawn"
ATTRIBUTES = ("colour", "shape", "position", "size", "background")


@dataclass
class Analysis:
    colour: str | None
    shape: str | None
    position: str | None
    size: str | None
    background: str
    area: int
    centroid: tuple[float, float] | None = None
    shape_scores: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _nearest(colour: np.ndarray, table: dict[str, tuple[int, int, int]]) -> str:
    names = list(table)
    values = np.array([table[n] for n in names], dtype=np.float32)
    return names[int(np.argmin(((values - colour[None, :]) ** 2).sum(axis=1)))]


def _background_table(include_extra: bool = True) -> dict[str, tuple[int, int, int]]:
    return {**BACKGROUNDS, **(EXTRA_BACKGROUNDS if include_extra else {})}


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, index=range(1, count + 1))
    return labels == (int(np.argmax(sizes)) + 1)


@functools.cache
def _shape_geometry(shape: str) -> tuple[float, float, float]:
    """(area / r², centroid x offset / r, centroid y offset / r) of a shape drawn by `data.shape_polygon`."""
    r, c = 100.0, 200.0
    cov = coverage_map(shape, c, c, r, size=400, supersample=1)
    total = float(cov.sum())
    ys, xs = np.mgrid[0:400, 0:400]
    return total / r**2, (float((cov * (xs + 0.5)).sum()) / total - c) / r, (float((cov * (ys + 0.5)).sum()) / total - c) / r


def coverage_map(shape: str, cx: float, cy: float, r: float, size: int = SIZE, supersample: int = 4) -> np.ndarray:
    """How much of each pixel `shape` (centre cx, cy, "radius" r, in pixels) covers: floats in [0, 1]."""
    k = supersample
    canvas = Image.new("L", (size * k, size * k), 0)
    draw = ImageDraw.Draw(canvas)
    polygon = shape_polygon(shape, cx * k, cy * k, r * k)
    if polygon is None:
        draw.ellipse([(cx - r) * k, (cy - r) * k, (cx + r) * k, (cy + r) * k], fill=255)
    else:
        draw.polygon(polygon, fill=255)
    if k != 1:
        canvas = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(canvas).astype(np.float32) / 255.0


def _pool(a: np.ndarray, k: int = POOL) -> np.ndarray:
    h, w = a.shape
    return a[: h - h % k, : w - w % k].reshape(h // k, k, w // k, k).mean(axis=(1, 3))


def classify_shape(array: np.ndarray, background: np.ndarray, colour: np.ndarray,
                   region: np.ndarray) -> tuple[str | None, dict[str, float], float | None]:
    """Analysis by synthesis: the foreground's coverage (projection of each pixel on the background→colour axis,
    inside `region`) against each shape drawn with the same area and centroid, both averaged over 4×4 blocks (the
    VAE's resolution), so blur does not decide. Scores are 1 - normalised L1 distance; the best wins."""
    axis = colour[None, None, :] - background
    norm = (axis**2).sum(axis=2)
    cov = ((array - background) * axis).sum(axis=2) / np.maximum(norm, 1.0)
    cov = np.clip(cov, 0.0, 1.0) * region
    area = float(cov.sum())
    if area < MIN_BLOB:
        return None, {}, None
    ys, xs = np.mgrid[0: cov.shape[0], 0: cov.shape[1]]
    cx, cy = float((cov * (xs + 0.5)).sum()) / area, float((cov * (ys + 0.5)).sum()) / area
    observed = _pool(cov)
    scores, radii = {}, {}
    for shape in SHAPES:
        per_r2, ox, oy = _shape_geometry(shape)
        r = radii[shape] = math.sqrt(area / per_r2)
        ideal = coverage_map(shape, cx - ox * r, cy - oy * r, r, size=cov.shape[0])
        scores[shape] = 1.0 - float(np.abs(_pool(ideal) - observed).sum() * POOL * POOL) / (2 * area)
    best = max(scores, key=lambda k: scores[k])
    return best, scores, radii[best]


def analyze(image: Image.Image) -> Analysis:
    """Measure what a generated image shows (see the module docstring)."""
    if image.size != (SIZE, SIZE):
        image = image.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    array = np.asarray(image.convert("RGB")).astype(np.float32)
    h, w, _ = array.shape
    half = h // 2
    top_border = np.concatenate([array[:2, :].reshape(-1, 3), array[:half, :2].reshape(-1, 3),
                                 array[:half, -2:].reshape(-1, 3)])
    bottom_border = np.concatenate([array[-2:, :].reshape(-1, 3), array[half:, :2].reshape(-1, 3),
                                    array[half:, -2:].reshape(-1, 3)])
    top, bottom = np.median(top_border, axis=0), np.median(bottom_border, axis=0)
    table = _background_table()
    top_name, bottom_name = _nearest(top, table), _nearest(bottom, table)
    background = top_name if top_name == bottom_name else f"{top_name} and {bottom_name}"
    expected = np.empty_like(array)
    expected[:half] = top
    expected[half:] = bottom
    distance = np.sqrt(((array - expected) ** 2).sum(axis=2))
    mask = _largest_blob(distance > FOREGROUND_DISTANCE)
    area = int(mask.sum())
    if area < MIN_BLOB:
        return Analysis(colour=None, shape=None, position=None, size=None, background=background, area=area)
    ys, xs = np.nonzero(mask)
    cx, cy = float(xs.mean()) + 0.5, float(ys.mean()) + 0.5
    cell = (min(2, int(cx * 3 / w)), min(2, int(cy * 3 / h)))
    # colour: the inner pixels (away from anti-aliased edges) when there are enough
    from scipy import ndimage

    # colour: the most covered pixels (the quarter farthest from the background; edges are blends)
    far = distance[mask]
    pixels = array[mask][far >= np.quantile(far, 0.75)]
    colour = _nearest(np.median(pixels, axis=0), COLOURS)
    region = ndimage.binary_dilation(mask, iterations=2)
    shape, scores, radius = classify_shape(array, expected, np.array(COLOURS[colour], dtype=np.float32), region)
    # size: the "radius" that gives the measured shape the foreground's area
    size = min(SIZES, key=lambda name: abs(radius - SIZES[name])) if radius else None
    return Analysis(colour=colour, shape=shape, position=POSITION_NAMES[cell], size=size, background=background,
                    area=area, centroid=(cx, cy), shape_scores=scores)


def score(scene: Scene, analysis: Analysis) -> dict[str, bool]:
    """Which attributes of `scene` the image shows."""
    return {
        "colour": analysis.colour == scene.colour,
        "shape": analysis.shape == scene.shape,
        "position": analysis.position == scene.position,
        "size": analysis.size == scene.size,
        "background": analysis.background == scene.background,
    }


# --- the prompt set -------------------------------------------------------------------------------------


def evaluation_scenes(count: int = 48, seed: int = 1234, background: str | None = None) -> list[Scene]:
    """A balanced set: shapes and colours cycle (every shape meets every colour over 24 prompts), positions,
    sizes and backgrounds drawn at random with a fixed seed. `background` forces one background (e.g. "night")."""
    rng = random.Random(seed)
    backgrounds = list(BACKGROUNDS) + [f"{a} and {b}" for a in BACKGROUNDS for b in BACKGROUNDS if a != b]
    cells = [(c, r) for r in range(3) for c in range(3)]
    colours = list(COLOURS)
    scenes = []
    for i in range(count):
        scenes.append(Scene(
            shape=SHAPES[i % len(SHAPES)], colour=colours[(i // len(SHAPES) + i) % len(colours)],
            size=rng.choice(list(SIZES)), cell=rng.choice(cells),
            background=background or rng.choice(backgrounds),
        ))
    return scenes


# --- running it -----------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    label: str
    accuracy: dict[str, float]
    count: int
    records: list[dict[str, Any]]
    images: list[Image.Image]
    seconds: float

    def summary(self) -> dict[str, Any]:
        return {"label": self.label, "images": self.count, "accuracy": self.accuracy, "seconds": round(self.seconds, 1)}


def evaluate(engine: Any, scenes: Sequence[Scene], seeds: int = 2, *, model: str | None = None,
             config: str | None = None, lora: str | Path | None = None, lora_weight: float = 1.0,
             steps: int = 20, cfg: float = 7.0, sampler: str = "DPM++ 2M", label: str = "",
             background_words: bool = True) -> EvalResult:
    """Generate every scene's caption with seeds 0..seeds-1 through `engine` and score the images."""
    from .lora import applied_lora

    started = time.time()
    base = engine.load_model(model, config=config)
    # through sdcore's own LoRA plugin (the `lora` request option) when it is installed, else merged here
    via_option = bool(lora) and engine.request_options.get("lora") is not None
    options = {"lora": {"loras": [{"name": str(lora), "weight": lora_weight}]}} if via_option else {}
    context = applied_lora(base.unet, base.text_encoder, lora, lora_weight) if lora and not via_option \
        else nullcontext(0)
    records, images = [], []
    totals = dict.fromkeys(ATTRIBUTES, 0)
    totals["all"] = 0
    with context:
        for index, scene in enumerate(scenes):
            prompt = caption(scene)
            result = engine.generate({
                "prompt": prompt, "model": model, "config": config, "seed": 1000 + index * 10, "batch_size": seeds,
                "steps": steps, "cfg_scale": cfg, "sampler": sampler, "width": SIZE, "height": SIZE,
                "options": options,
            })
            for seed, image in zip(result.seeds, result.images, strict=True):
                analysis = analyze(image)
                marks = score(scene, analysis)
                for key, ok in marks.items():
                    totals[key] += int(ok)
                totals["all"] += int(marks["colour"] and marks["shape"] and marks["position"] and marks["background"])
                records.append({"prompt": prompt, "seed": seed, "expected": {
                    "colour": scene.colour, "shape": scene.shape, "position": scene.position, "size": scene.size,
                    "background": scene.background}, "measured": analysis.as_dict(), "correct": marks})
                images.append(image)
    n = max(1, len(records))
    accuracy = {key: round(value / n, 4) for key, value in totals.items()}
    return EvalResult(label=label, accuracy=accuracy, count=len(records), records=records, images=images,
                      seconds=time.time() - started)


def annotated_grid(result: EvalResult, columns: int, scale: int = 2) -> Image.Image:
    """The images with a thin bar under each: green when colour, shape, position and background are right,
    red otherwise (and small ticks per attribute: colour, shape, position, size, background)."""
    cell = SIZE * scale
    bar = 6
    rows = (len(result.images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * (cell + 2), rows * (cell + bar + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, record) in enumerate(zip(result.images, result.records, strict=True)):
        x, y = (i % columns) * (cell + 2), (i // columns) * (cell + bar + 2)
        grid.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        width = cell / len(ATTRIBUTES)
        for k, key in enumerate(ATTRIBUTES):
            ok = record["correct"][key]
            draw.rectangle([x + k * width, y + cell + 1, x + (k + 1) * width - 2, y + cell + bar],
                           fill=(40, 170, 60) if ok else (210, 40, 40))
    return grid


def format_table(results: Sequence[EvalResult]) -> str:
    keys = ("colour", "shape", "position", "size", "background", "all")
    header = f"{'':28s}" + "".join(f"{k:>11s}" for k in keys)
    lines = [header]
    for result in results:
        lines.append(f"{result.label[:28]:28s}" + "".join(f"{100 * result.accuracy[k]:10.1f}%" for k in keys))
    return "\n".join(lines)


def with_demo_config(model: str | None, config: str | None) -> tuple[str | None, str | None]:
    """No model means the demo model, with its shipped config folder (also where the engine does not add it)."""
    from sdcore.demo import demo_config_for, demo_model_path

    if model is None and demo_model_path() is not None:
        model = str(demo_model_path())
    if config is None and model is not None:
        config = demo_config_for(model)
    return model, config


def run_evaluate_command(*, model: str | None, config: str | None, lora_path: str | None, no_lora: bool,
                         prompt_count: int, seeds: int, steps: int, cfg: float, sampler: str, out_dir: str,
                         as_json: bool) -> list[EvalResult]:
    import click

    from sdcore.demo import demo_lora_path
    from sdcore.engine import Engine

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lora = None if no_lora else (lora_path or (demo_lora_path() if model is None else None))
    model, config = with_demo_config(model, config)
    results = []
    with Engine(device="cpu") as engine:
        scenes = evaluation_scenes(prompt_count)
        common = dict(model=model, config=config, steps=steps, cfg=cfg, sampler=sampler, seeds=seeds)
        results.append(evaluate(engine, scenes, label="base model", **common))
        if lora is not None:
            night = evaluation_scenes(max(12, prompt_count // 2), seed=99, background="night")
            results.append(evaluate(engine, night, label="night prompts, no LoRA", **common))
            results.append(evaluate(engine, night, label=f"night prompts + {Path(lora).stem}", lora=lora, **common))
            results.append(evaluate(engine, scenes, label=f"base prompts + {Path(lora).stem}", lora=lora, **common))
    columns = 2 * seeds * 4 if seeds <= 3 else seeds
    for i, result in enumerate(results):
        name = "grid.png" if i == 0 else f"grid-{i}-{result.label.replace(' ', '_').replace(',', '')}.png"
        annotated_grid(result, columns).save(out / name)
    report = {"settings": {k: v for k, v in common.items()}, "results": [r.summary() for r in results]}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "records.json").write_text(json.dumps([r.records for r in results], indent=1) + "\n", encoding="utf-8")
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(format_table(results))
        click.echo(f"Grid: {out / 'grid.png'} (bars under each image: colour, shape, position, size, background)")
    return results


__all__ = ["Analysis", "EvalResult", "analyze", "annotated_grid", "classify_shape", "coverage_map", "evaluate",
           "evaluation_scenes", "format_table", "score"]
