"""Did the picture come out as asked? Pixel analysis of generated shape images.

For one image (`analyze`):

- background: the median colour of the border of the top half and of the bottom half, each named by the nearest
  background colour ("white", or "white and black" for a two-colour background: top and bottom);
- foreground: the pixels far from the background colour of their half, largest connected blob only;
- colour: the median colour of the blob's inner pixels, named by the nearest palette colour;
- position: the cell of the 3×3 grid that holds the blob's centroid;
- size: the blob's bounding box compared with the three sizes;
- shape: the blob's mask, cropped to its bounding box and resized to 24×24, compared (IoU) with the four ideal
  shapes drawn the same way; the best match wins.

`evaluate` generates a grid of prompts × seeds through the real `sdcore.Engine`, optionally with a LoRA merged
into the model, and returns the accuracy per attribute; `run_evaluate_command` is `sdcore demo evaluate`.
"""

from __future__ import annotations

import functools
import json
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
    CELL_CENTRES,
    COLOURS,
    EXTRA_BACKGROUNDS,
    POSITION_NAMES,
    SHAPES,
    SIZE,
    SIZES,
    Scene,
    caption,
    render,
)

TEMPLATE = 24
FOREGROUND_DISTANCE = 80.0  # RGB distance from the background that makes a pixel foreground
MIN_BLOB = 6  # pixels; fewer means "no shape drawn"
EXTENT_PER_RADIUS = {"circle": 2.0, "square": 1.7, "triangle": 2.0, "star": 2.19}  # see data.shape_polygon
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


def _mask_template(mask: np.ndarray) -> np.ndarray | None:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    crop = mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1].astype(np.uint8) * 255
    resized = Image.fromarray(crop).resize((TEMPLATE, TEMPLATE), Image.Resampling.BILINEAR)
    return np.asarray(resized) >= 128


@functools.lru_cache(maxsize=1)
def shape_templates() -> dict[str, np.ndarray]:
    """The ideal masks of the four shapes (large, centred, no jitter), cropped and resized like a blob."""
    templates = {}
    for shape in SHAPES:
        image = render(Scene(shape=shape, colour="red", size="large", cell=(1, 1), background="white"), size=SIZE * 4)
        array = np.asarray(image).astype(np.float32)
        mask = np.abs(array - np.array(BACKGROUNDS["white"], dtype=np.float32)).sum(axis=2) > 120
        template = _mask_template(mask)
        assert template is not None
        templates[shape] = template
    return templates


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, index=range(1, count + 1))
    return labels == (int(np.argmax(sizes)) + 1)


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

    inner = ndimage.binary_erosion(mask)
    pixels = array[inner] if inner.sum() >= 4 else array[mask]
    colour = _nearest(np.median(pixels, axis=0), COLOURS)
    template = _mask_template(mask)
    scores = {}
    if template is not None:
        for name, ideal in shape_templates().items():
            union = np.logical_or(template, ideal).sum()
            scores[name] = float(np.logical_and(template, ideal).sum() / union) if union else 0.0
    shape = max(scores, key=lambda k: scores[k]) if scores else None
    # size: the bounding box's larger side against each size's ideal extent for the measured shape
    extent = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
    factor = EXTENT_PER_RADIUS.get(shape or "circle", 2.0)
    size = min(SIZES, key=lambda name: abs(extent - factor * SIZES[name]))
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
    context = applied_lora(base.unet, base.text_encoder, lora, lora_weight) if lora else nullcontext(0)
    records, images = [], []
    totals = dict.fromkeys(ATTRIBUTES, 0)
    totals["all"] = 0
    with context:
        for index, scene in enumerate(scenes):
            prompt = caption(scene)
            result = engine.generate({
                "prompt": prompt, "model": model, "config": config, "seed": 1000 + index * 10, "batch_size": seeds,
                "steps": steps, "cfg_scale": cfg, "sampler": sampler, "width": SIZE, "height": SIZE,
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


def run_evaluate_command(*, model: str | None, config: str | None, lora_path: str | None, no_lora: bool,
                         prompt_count: int, seeds: int, steps: int, cfg: float, sampler: str, out_dir: str,
                         as_json: bool) -> list[EvalResult]:
    import click

    from sdcore.demo import demo_lora_path
    from sdcore.engine import Engine

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lora = None if no_lora else (lora_path or (demo_lora_path() if model is None else None))
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


__all__ = ["Analysis", "EvalResult", "analyze", "annotated_grid", "evaluate", "evaluation_scenes", "format_table",
           "score", "shape_templates", "CELL_CENTRES"]
