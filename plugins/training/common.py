"""Pieces both trainers share: the image-folder dataset, the noise schedule, EMA, checkpoints, the loss curve."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
MASK_SUFFIX = ".mask"  # NAME.mask.png: the subject mask of NAME.png


# --- data -----------------------------------------------------------------------------------------------


@dataclass
class ImageFolder:
    """A folder of images with same-named `.txt` captions (kohya / A1111 layout), loaded into memory.

    `images` is uint8 [N, 3, H, W] (resized and centre-cropped to `resolution`), `captions` the texts ("" when an
    image has no caption file). Sub-folders are searched too (kohya's `N_name` repeat folders work, without repeats).
    `NAME.mask.png` beside an image is its subject's mask (white = subject), read into `masks` (uint8 [N, 1, H, W],
    cropped as the image; all zero where an image has none, with `has_mask` False) and never taken as an image.
    """

    images: torch.Tensor
    captions: list[str]
    paths: list[Path]
    masks: torch.Tensor | None = None
    has_mask: torch.Tensor | None = None

    @classmethod
    def load(cls, root: str | os.PathLike[str], resolution: int, limit: int | None = None,
             progress: bool = False) -> ImageFolder:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"Training data folder {root} does not exist.")
        paths = sorted(p for p in root.rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.endswith(MASK_SUFFIX))
        if limit is not None:
            paths = paths[:limit]
        if not paths:
            raise ValueError(f"{root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
        images = torch.empty((len(paths), 3, resolution, resolution), dtype=torch.uint8)
        masks: torch.Tensor | None = None  # allocated at the first mask: most folders have none
        has_mask = torch.zeros(len(paths), dtype=torch.bool)
        captions = []
        iterator: Iterable[tuple[int, Path]] = enumerate(paths)
        if progress:
            from tqdm import tqdm

            iterator = tqdm(iterator, total=len(paths), desc="Loading images", unit="img", leave=False)
        for i, path in iterator:
            with Image.open(path) as raw:
                image = fit_square(raw.convert("RGB"), resolution)
            images[i] = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
            text = path.with_suffix(".txt")
            captions.append(text.read_text(encoding="utf-8").strip() if text.is_file() else "")
            mask = path.with_name(path.stem + MASK_SUFFIX + ".png")
            if mask.is_file():
                if masks is None:
                    masks = torch.zeros((len(paths), 1, resolution, resolution), dtype=torch.uint8)
                with Image.open(mask) as raw:
                    masks[i, 0] = torch.from_numpy(np.asarray(fit_square(raw.convert("L"), resolution)).copy())
                has_mask[i] = True
        return cls(images=images, captions=captions, paths=paths, masks=masks,
                   has_mask=has_mask if masks is not None else None)

    def __len__(self) -> int:
        return len(self.captions)


def fit_square(image: Image.Image, resolution: int) -> Image.Image:
    """Centre-crop to a square and resize to `resolution`."""
    w, h = image.size
    if w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return image


def to_pixels(batch: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float in [-1, 1]."""
    return batch.float().div(127.5).sub(1.0)


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A generator that depends only on (seed, step, stream), so a resumed run draws the same numbers."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + stream * 104_729) % (2**63 - 1))


# --- noise schedule -------------------------------------------------------------------------------------


def alphas_cumprod(scheduler_config: dict[str, Any]) -> torch.Tensor:
    """ᾱ_t of a DDPM-family scheduler config (SD 1.x: scaled_linear 0.00085 -> 0.012, 1000 steps)."""
    n = int(scheduler_config.get("num_train_timesteps", 1000))
    start = float(scheduler_config.get("beta_start", 0.00085))
    end = float(scheduler_config.get("beta_end", 0.012))
    kind = scheduler_config.get("beta_schedule", "scaled_linear")
    if kind == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    elif kind == "linear":
        betas = torch.linspace(start, end, n, dtype=torch.float64)
    else:
        raise ValueError(f"beta_schedule {kind!r} is not supported by the trainer")
    return torch.cumprod(1.0 - betas, dim=0).float()


def min_snr_weights(acp: torch.Tensor, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023) for ε- or v-prediction; γ <= 0 gives ones."""
    if gamma <= 0:
        return torch.ones(timesteps.shape, dtype=torch.float32)
    a = acp[timesteps]
    snr = a / (1 - a)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)


def high_noise_weights(acp: torch.Tensor, timesteps: torch.Tensor, cap: float) -> torch.Tensor:
    """Extra ε-loss weight at high noise: 1/SNR (the x0-error's weight), capped at `cap`, where SNR < 1; 1 elsewhere.

    With ε-prediction an error in the predicted image at t near 1000 costs SNR (≈0.005) times less than the same
    error at SNR 1, so the layout (decided at high noise) is learned last. Weighting those steps up lets the
    position and the background follow the caption sooner. `cap` <= 1 gives ones."""
    if cap <= 1:
        return torch.ones(timesteps.shape, dtype=torch.float32)
    a = acp[timesteps]
    snr = a / (1 - a)
    return torch.clamp(1.0 / snr, min=1.0, max=cap)


def lr_factor(step: int, total: int, warmup: int, final: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to `final` of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


# --- EMA ------------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of parameters, with the usual (1+n)/(10+n) warm-up of the decay."""

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float) -> None:
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and averaged weights (call twice to undo)."""
        for p, s in zip(self.params, self.shadow, strict=True):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)

    def state_dict(self) -> list[torch.Tensor]:
        return self.shadow

    def load_state_dict(self, tensors: list[torch.Tensor]) -> None:
        for s, t in zip(self.shadow, tensors, strict=True):
            s.copy_(t)


# --- checkpoints ----------------------------------------------------------------------------------------


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically (a crash never leaves half a checkpoint). Tensors and plain Python values only, so
    `load_checkpoint` can read it with `weights_only=True`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


# --- reporting ------------------------------------------------------------------------------------------


def smooth(values: Sequence[float], window: int) -> list[float]:
    out, total, queue = [], 0.0, []
    for v in values:
        queue.append(v)
        total += v
        if len(queue) > window:
            total -= queue.pop(0)
        out.append(total / len(queue))
    return out


def plot_loss(losses: Sequence[float], path: str | os.PathLike[str], title: str = "training loss",
              width: int = 640, height: int = 400) -> Path:
    """Draw the loss per step (grey) and its moving average (blue) on a log scale, as a PNG (PIL only)."""
    path = Path(path)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, width - 20, 30, height - 40
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, 8), title, fill="black")
    values = [v for v in losses if v > 0 and math.isfinite(v)]
    if values:
        lo, hi = math.log10(min(values)), math.log10(max(values))
        if hi - lo < 1e-6:
            lo, hi = lo - 0.5, hi + 0.5
        n = len(losses)

        def xy(i: int, v: float) -> tuple[float, float]:
            x = left + (right - left) * (i / max(1, n - 1))
            y = bottom - (bottom - top) * ((math.log10(max(v, 10**lo)) - lo) / (hi - lo))
            return x, y

        for exponent in range(math.floor(lo), math.ceil(hi) + 1):
            for mantissa in (1, 2, 5):
                value = mantissa * 10**exponent
                if lo <= math.log10(value) <= hi:
                    _, y = xy(0, value)
                    draw.line([left, y, right, y], fill=(225, 225, 225))
                    draw.text((4, y - 6), f"{value:g}", fill="black")
        stride = max(1, n // 2000)
        raw = [xy(i, v) for i, v in enumerate(losses) if i % stride == 0 and v > 0 and math.isfinite(v)]
        if len(raw) > 1:
            draw.line(raw, fill=(190, 190, 190), width=1)
        avg = smooth(losses, max(1, n // 50))
        points = [xy(i, v) for i, v in enumerate(avg) if i % stride == 0 and v > 0 and math.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=(30, 80, 220), width=2)
        for frac in (0, 0.25, 0.5, 0.75, 1.0):
            step = int(frac * (n - 1))
            x, _ = xy(step, 10**lo)
            draw.text((x - 10, bottom + 6), str(step + 1), fill="black")
    draw.text((right - 40, bottom + 22), "step", fill="black")
    image.save(path)
    return path


def image_grid(images: Sequence[Image.Image], columns: int, scale: int = 1, gap: int = 2) -> Image.Image:
    if not images:
        return Image.new("RGB", (1, 1), "white")
    w, h = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * (w + gap) - gap, rows * (h + gap) - gap), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * (w + gap), (i // columns) * (h + gap)))
    if scale != 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    return grid


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
