"""A1111-compatible seeds and initial noise, in A1111's "RNG: CPU" mode.

Why CPU: a CUDA generator gives a different stream from a CPU one (and from another vendor's GPU), so a seed
only reproduces an image everywhere if every random draw comes from a CPU `torch.Generator` and is moved to
the device afterwards. That is A1111's `randn_source = "CPU"` setting; sdcore always uses it and writes
`RNG: CPU` into the infotext.

The rules reproduced here (A1111 `modules/processing.py` and `modules/rng.py`):

* one generator per image, seeded with that image's seed; the image's initial noise is the first draw of
  shape `(C, H, W)` from it, so image *i* of a batch equals a batch of one made with its seed;
* seeds of a batch: image *i* gets `seed + i`, except when variation (subseed) strength is not 0, in which
  case every image keeps `seed` and only the subseeds count up (`subseed + i`): a batch then shows
  variations of one picture;
* variation seeds blend the seed's noise with the subseed's noise by A1111's `slerp`;
* "resize seed from" draws the noise at another size and pastes it centred into the real-size noise;
* the generators then keep running: ancestral and SDE samplers draw their per-step noise from them
  (A1111's `ImageRNG.next`), optionally after re-seeding with `seed + ENSD` (eta noise seed delta).
"""

from __future__ import annotations

import numbers
import secrets
from collections.abc import Sequence

import torch

from sdcore.errors import InvalidRequest

__all__ = [
    "MAX_SEED",
    "RANDOM_SEED",
    "create_generators",
    "create_noise",
    "image_seeds",
    "next_noise",
    "resolve_seed",
    "slerp",
]

MAX_SEED = 2**32 - 1
"""Largest seed a request may give. A1111's UI and API use the 32-bit range; torch would take 64 bits, but
seeds above 2**32 - 1 would not survive a trip through A1111 clients that store them as 32-bit numbers."""

RANDOM_SEED = -1
"""The request value that means "pick a seed for me" (A1111's -1)."""


def resolve_seed(seed: int) -> int:
    """Turn a request seed into the concrete seed that will be used and recorded.

    `-1` picks a fresh random seed in `[0, MAX_SEED]`; the caller must record the returned value (in the
    result and the infotext) so the image can be made again. Any other value outside `[0, MAX_SEED]` is a
    mistake, not a wish for randomness, so it is refused instead of silently replaced like A1111 does.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise InvalidRequest(
            f"seed must be an integer from 0 to {MAX_SEED}, or -1 for a random seed; got {seed!r}"
        )
    seed = int(seed)
    if seed == RANDOM_SEED:
        return secrets.randbelow(MAX_SEED + 1)
    if seed < 0 or seed > MAX_SEED:
        raise InvalidRequest(f"seed must be from 0 to {MAX_SEED}, or -1 for a random seed; got {seed}")
    return seed


def image_seeds(
    seed: int,
    subseed: int | None,
    batch_size: int,
    batch_index_offset: int = 0,
    *,
    subseed_strength: float = 0.0,
) -> tuple[list[int], list[int]]:
    """Seeds and subseeds of `batch_size` consecutive images, starting at image `batch_index_offset`.

    Image *k* (counted over the whole job, so batch *n* of size *b* starts at `n * b`) gets seed `seed + k`
    and subseed `subseed + k`, exactly like A1111's `all_seeds` / `all_subseeds`. The one A1111 twist kept
    here on purpose: when `subseed_strength` is not 0 the seed does **not** count up; every image uses
    `seed` and only the subseed varies, which is what makes a variation batch look like one picture.

    `seed` and `subseed` must already be resolved (see `resolve_seed`). `subseed=None` means no variation
    seed; the subseeds returned are then `seed + k` placeholders that `create_noise` ignores at strength 0.
    Seeds may exceed `MAX_SEED` by up to the batch size, as in A1111; torch accepts them.
    """
    if batch_size < 1:
        raise InvalidRequest(f"batch size must be at least 1; got {batch_size}")
    if batch_index_offset < 0:
        raise InvalidRequest(f"batch index offset must not be negative; got {batch_index_offset}")
    if subseed is None and subseed_strength != 0:
        raise InvalidRequest("a variation seed strength was given without a variation seed (subseed)")
    indices = range(batch_index_offset, batch_index_offset + batch_size)
    seeds = [seed + (k if subseed_strength == 0 else 0) for k in indices]
    base_subseed = seed if subseed is None else subseed
    subseeds = [base_subseed + k for k in indices]
    return seeds, subseeds


def create_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One freshly seeded CPU generator per seed (A1111 `create_generator` in CPU mode)."""
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


def _randn(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The first float32 draw of `shape` from a CPU generator seeded with `seed`.

    A1111 does this with the global torch RNG (`torch.manual_seed` + `torch.randn`); a private generator
    gives the same numbers without touching global state that other code (and other threads) rely on.
    """
    return torch.randn(
        shape, generator=torch.Generator(device="cpu").manual_seed(int(seed)), dtype=torch.float32
    )


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation as A1111 defines it for variation seeds (`modules/rng.py`).

    Reproduced with its quirks, because a variation seed must give A1111's image:

    * norms and dot products are taken over **dimension 1** (the height axis of a `(C, H, W)` noise), so
      each `(channel, column)` vector is interpolated on its own;
    * `val=0` gives `low`, `val=1` gives `high`;
    * when the vectors are nearly parallel (mean cosine above 0.9995) it falls back to a linear blend, and
      that blend has the weights the other way round: `low * val + high * (1 - val)`.
    """
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    low_weight = (torch.sin((1.0 - val) * omega) / so).unsqueeze(1)
    high_weight = (torch.sin(val * omega) / so).unsqueeze(1)
    return low_weight * low + high_weight * high


def _paste_centered(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Paste `source` (C, h, w) into the centre of `target` (C, H, W), cropping whichever is larger.

    This is A1111's "resize seed from": the composition made at the old size stays in the middle of the
    new canvas; offsets round down, as A1111's integer division does.
    """
    dx = (target.shape[2] - source.shape[2]) // 2
    dy = (target.shape[1] - source.shape[1]) // 2
    w = source.shape[2] if dx >= 0 else source.shape[2] + 2 * dx
    h = source.shape[1] if dy >= 0 else source.shape[1] + 2 * dy
    tx, ty = max(dx, 0), max(dy, 0)
    sx, sy = max(-dx, 0), max(-dy, 0)
    target[:, ty : ty + h, tx : tx + w] = source[:, sy : sy + h, sx : sx + w]
    return target


def create_noise(
    shape: tuple[int, int, int],
    seeds: Sequence[int],
    subseeds: Sequence[int] | None = None,
    subseed_strength: float = 0.0,
    seed_resize_from: tuple[int, int] | None = None,
    *,
    eta_noise_seed_delta: int = 0,
    latent_factor: int = 8,
) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Initial latent noise for a batch, one image per seed, as A1111's `ImageRNG.first()` makes it.

    Args:
        shape: latent shape of one image, `(C, H, W)`, e.g. `(4, height // 8, width // 8)`.
        seeds: one seed per image (see `image_seeds`).
        subseeds: variation seeds, one per image; a missing entry counts as subseed 0, like A1111.
        subseed_strength: 0 (plain seed noise) to 1 (pure subseed noise), blended with `slerp`.
        seed_resize_from: `(width, height)` in **pixels** (the order of A1111's `Seed resize from: WxH`),
            or None. Noise is drawn at `(C, height // latent_factor, width // latent_factor)` and pasted
            centred into noise of `shape`. A value with a zero or negative side means "off", as in A1111.
        eta_noise_seed_delta: A1111's ENSD setting. When not 0, each image's generator is re-seeded with
            `seed + ENSD` after the initial draw, so ancestral samplers get a different step-noise stream.
        latent_factor: pixels per latent cell (8 for SD 1.x/2.x/XL).

    Returns:
        `(noise, generators)`: float32 CPU noise of shape `(B, C, H, W)`, and the per-image CPU generators
        in the state right after the initial draw (or re-seeded for ENSD). Pass the generators on for the
        per-step noise of ancestral/SDE samplers so each image keeps drawing from its own stream; see
        `next_noise`. Move the noise to the device and dtype yourself: the numbers are made on the CPU in
        float32 so they do not depend on either.
    """
    if len(shape) != 3 or any(int(n) < 1 for n in shape):
        raise InvalidRequest(
            f"noise shape must be (channels, height, width) with positive sizes; got {shape!r}"
        )
    if len(seeds) == 0:
        raise InvalidRequest("create_noise needs at least one seed")
    if not 0.0 <= subseed_strength <= 1.0:
        raise InvalidRequest(f"variation seed strength must be from 0 to 1; got {subseed_strength}")
    shape = (int(shape[0]), int(shape[1]), int(shape[2]))

    noise_shape = shape
    if seed_resize_from is not None:
        from_w, from_h = seed_resize_from
        if from_w > 0 and from_h > 0:
            noise_shape = (shape[0], from_h // latent_factor, from_w // latent_factor)
            if noise_shape[1] < 1 or noise_shape[2] < 1:
                raise InvalidRequest(
                    f"seed resize from {from_w}x{from_h} is smaller than one latent cell "
                    f"({latent_factor}x{latent_factor} pixels); give a larger size or none"
                )

    generators = create_generators(seeds)
    images: list[torch.Tensor] = []
    for i, (seed, generator) in enumerate(zip(seeds, generators, strict=True)):
        subnoise = None
        if subseeds is not None and subseed_strength != 0:
            subseed = subseeds[i] if i < len(subseeds) else 0
            subnoise = _randn(subseed, noise_shape)

        if noise_shape != shape:
            noise = _randn(seed, noise_shape)
        else:
            noise = torch.randn(shape, generator=generator, dtype=torch.float32)

        if subnoise is not None:
            noise = slerp(subseed_strength, noise, subnoise)

        if noise_shape != shape:
            # The image's own generator still makes the first full-size draw, so its stream position is
            # the same as without resizing, and the step noise that follows does not depend on the option.
            canvas = torch.randn(shape, generator=generator, dtype=torch.float32)
            noise = _paste_centered(canvas, noise)

        images.append(noise)

    if eta_noise_seed_delta:
        generators = create_generators([int(s) + int(eta_noise_seed_delta) for s in seeds])

    return torch.stack(images), generators


def next_noise(generators: Sequence[torch.Generator], shape: tuple[int, int, int]) -> torch.Tensor:
    """The next per-step noise for every image, `(B, C, H, W)` float32 on the CPU (A1111 `ImageRNG.next`).

    For schedulers that accept ready-made noise (`variance_noise=` in DPMSolverMultistep and DDIM) or for
    an own sampling loop. It draws exactly what `torch.randn((1, C, H, W), generator=g)` draws per image,
    i.e. what diffusers' `randn_tensor` draws when given the same generator list in float32.
    """
    return torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in generators])
