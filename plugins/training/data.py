"""Synthetic training data: simple shapes in plain English, drawn by code.

Every image is a coloured shape (circle, square, triangle, star) of some size in one of nine positions on a plain
or two-colour background, with a caption such as "a small red circle at the top left on a white background".
`Scene` holds the attributes, `render(scene)` draws it (anti-aliased by supersampling) and `caption(scene)` says
it. `write_dataset` writes a folder of `NNNNNN.png` + `NNNNNN.txt` pairs, the format `sdcore train` reads, and
`NNNNNN.mask.png`: where the shape is, for the trainer's grounding loss.

The same palette and geometry are what the evaluation (`evaluate.py`) measures generated images against.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 64  # image side in pixels
SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 220, 20),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (140, 40, 180),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
}
# Colours that only the LoRA data uses (the base model never sees them).
EXTRA_BACKGROUNDS: dict[str, tuple[int, int, int]] = {"night": (15, 20, 70)}
SIZES = {"small": 6.0, "medium": 9.0, "large": 12.0}  # "radius" in pixels
# (column, row) of the 3x3 grid -> the phrase; the first phrase is the canonical one.
POSITIONS: dict[tuple[int, int], tuple[str, ...]] = {
    (0, 0): ("at the top left",),
    (1, 0): ("at the top",),
    (2, 0): ("at the top right",),
    (0, 1): ("on the left",),
    (1, 1): ("in the centre", "in the center", "in the middle"),
    (2, 1): ("on the right",),
    (0, 2): ("at the bottom left",),
    (1, 2): ("at the bottom",),
    (2, 2): ("at the bottom right",),
}
POSITION_NAMES = {cell: phrases[0].split(" ", 2)[-1] for cell, phrases in POSITIONS.items()}
CELL_CENTRES = (12.0, 32.0, 52.0)


@dataclass(frozen=True)
class Scene:
    """What one image shows. `background` is one name ("white") or two ("white and black": top and bottom)."""

    shape: str
    colour: str
    size: str
    cell: tuple[int, int]
    background: str
    dx: float = 0.0  # jitter of the centre, pixels
    dy: float = 0.0
    scale: float = 1.0  # jitter of the size
    night_dots: tuple[tuple[float, float], ...] = ()  # white dots of a "night" background

    @property
    def position(self) -> str:
        return POSITION_NAMES[self.cell]

    @property
    def background_colours(self) -> tuple[str, str]:
        """(top, bottom) background colour names."""
        parts = self.background.split(" and ")
        return (parts[0], parts[-1])

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def rgb(name: str) -> tuple[int, int, int]:
    for table in (COLOURS, BACKGROUNDS, EXTRA_BACKGROUNDS):
        if name in table:
            return table[name]
    raise KeyError(f"unknown colour {name!r}")


def background_names(two_colour: bool = True) -> list[str]:
    """Every background of the base data: plain ones, then "top and bottom" pairs."""
    names = list(BACKGROUNDS)
    if two_colour:
        names += [f"{a} and {b}" for a in BACKGROUNDS for b in BACKGROUNDS if a != b]
    return names


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """The outline of `shape` centred at (cx, cy) with "radius" r; None for a circle (drawn as an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.85 * r), (cx - r, cy + 0.85 * r)]
    if shape == "star":
        outer, inner = 1.15 * r, 0.45 * 1.15 * r
        points = []
        for k in range(10):
            radius = outer if k % 2 == 0 else inner
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + 0.12 * r + radius * math.sin(angle)))
        return points
    raise KeyError(f"unknown shape {shape!r}")


def render(scene: Scene, size: int = SIZE) -> Image.Image:
    """Draw `scene` as an RGB image `size`×`size` (geometry is defined on a 64-pixel canvas and scaled)."""
    k = SUPERSAMPLE * size / SIZE
    big = SUPERSAMPLE * size
    image = Image.new("RGB", (big, big), rgb(scene.background_colours[0]))
    draw = ImageDraw.Draw(image)
    top, bottom = scene.background_colours
    if bottom != top:
        draw.rectangle([0, big // 2, big, big], fill=rgb(bottom))
    for x, y in scene.night_dots:
        d = 0.6 * k
        draw.ellipse([x * k - d, y * k - d, x * k + d, y * k + d], fill=(255, 255, 235))
    _draw_shape(draw, scene, k, rgb(scene.colour))
    return image.resize((size, size), Image.Resampling.BOX)


def render_mask(scene: Scene, size: int = SIZE) -> Image.Image:
    """The shape's coverage (255 inside, 0 outside, anti-aliased edges) as an "L" image: the grounding mask that
    `sdcore train full --grounding-weight` reads from `NAME.mask.png`."""
    k = SUPERSAMPLE * size / SIZE
    image = Image.new("L", (SUPERSAMPLE * size,) * 2, 0)
    _draw_shape(ImageDraw.Draw(image), scene, k, 255)
    return image.resize((size, size), Image.Resampling.BOX)


def _draw_shape(draw: ImageDraw.ImageDraw, scene: Scene, k: float, fill: tuple[int, int, int] | int) -> None:
    cx = (CELL_CENTRES[scene.cell[0]] + scene.dx) * k
    cy = (CELL_CENTRES[scene.cell[1]] + scene.dy) * k
    r = SIZES[scene.size] * scene.scale * k
    polygon = shape_polygon(scene.shape, cx, cy, r)
    if polygon is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(polygon, fill=fill)


def caption(scene: Scene, rng: random.Random | None = None, *, drop: float = 0.0) -> str:
    """A plain-English caption. With `rng`, synonyms vary and with `drop` > 0 the position or background
    phrase is left out with that probability each (so prompts that omit them still work)."""
    words = []
    if scene.size != "medium":
        words.append(scene.size)
    elif rng is not None and rng.random() < 0.5:
        words.append("medium")
    words += [scene.colour, scene.shape]
    words.insert(0, "an" if words[0][0] in "aeiou" else "a")
    phrases = POSITIONS[scene.cell]
    if rng is None or rng.random() >= drop:
        words.append(rng.choice(phrases) if rng is not None else phrases[0])
    if rng is None or rng.random() >= drop:
        words.append(f"on a {scene.background} background")
    return " ".join(words)


def random_scene(rng: random.Random, *, backgrounds: list[str] | None = None, two_colour: float = 0.35,
                 night: bool = False) -> Scene:
    """A random scene of the base data (or, with `night`, of the LoRA's night-sky data)."""
    if night:
        background = "night"
        dots = tuple((rng.uniform(2, 62), rng.uniform(2, 62)) for _ in range(rng.randint(4, 8)))
    else:
        dots = ()
        if backgrounds is not None:
            background = rng.choice(backgrounds)
        elif rng.random() < two_colour:
            a, b = rng.sample(list(BACKGROUNDS), 2)
            background = f"{a} and {b}"
        else:
            background = rng.choice(list(BACKGROUNDS))
    return Scene(
        shape=rng.choice(SHAPES), colour=rng.choice(list(COLOURS)), size=rng.choice(list(SIZES)),
        cell=(rng.randrange(3), rng.randrange(3)), background=background,
        dx=rng.uniform(-2, 2), dy=rng.uniform(-2, 2), scale=rng.uniform(0.92, 1.08), night_dots=dots,
    )


def scenes(count: int, seed: int = 0, **kwargs: object) -> Iterator[Scene]:
    rng = random.Random(seed)
    for _ in range(count):
        yield random_scene(rng, **kwargs)  # type: ignore[arg-type]


def write_dataset(out: str | Path, count: int, seed: int = 0, *, drop: float = 0.1, night: bool = False,
                  progress: bool = False) -> Path:
    """Write `count` images with captions to `out` (created); deterministic for a given seed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    caption_rng = random.Random(seed + 1)
    iterator = range(count)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="Drawing", unit="img")
    for i in iterator:
        scene = random_scene(rng, night=night)
        render(scene).save(out / f"{i:06d}.png", optimize=False, compress_level=1)
        render_mask(scene).save(out / f"{i:06d}.mask.png", optimize=False, compress_level=1)
        (out / f"{i:06d}.txt").write_text(caption(scene, caption_rng, drop=drop) + "\n", encoding="utf-8")
    return out


def random_colour_image(rng: random.Random, size: int = SIZE) -> Image.Image:
    """A shape image with arbitrary RGB colours (and sometimes dots): teaches the VAE every colour, not only
    the palette, so LoRAs can later ask for new ones."""
    scene = random_scene(rng, night=rng.random() < 0.2)
    k = SUPERSAMPLE
    big = size * k
    top = tuple(rng.randrange(256) for _ in range(3))
    bottom = top if rng.random() < 0.6 else tuple(rng.randrange(256) for _ in range(3))
    fill = tuple(rng.randrange(256) for _ in range(3))
    image = Image.new("RGB", (big, big), top)
    draw = ImageDraw.Draw(image)
    if bottom != top:
        draw.rectangle([0, big // 2, big, big], fill=bottom)
    for x, y in scene.night_dots:
        d = 0.6 * k
        draw.ellipse([x * k - d, y * k - d, x * k + d, y * k + d], fill=(255, 255, 235))
    cx, cy = (CELL_CENTRES[scene.cell[0]] + scene.dx) * k, (CELL_CENTRES[scene.cell[1]] + scene.dy) * k
    r = SIZES[scene.size] * scene.scale * k
    polygon = shape_polygon(scene.shape, cx, cy, r)
    if polygon is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(polygon, fill=fill)
    return image.resize((size, size), Image.Resampling.BOX)
