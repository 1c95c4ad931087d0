"""Tiny models for tests, written in the real on-disk formats.

The model families come from the plugin system (`register_model_families`), never from importing plugin
packages: any family that offers `build_tiny(variant, seed=...)` (and `save_diffusers(model, path)` for folders)
can make test models here, built-in or third-party.

    path = make_tiny_model(tmp_path)                                    # SD 1.5 single file (LDM keys)
    folder = make_tiny_model(tmp_path, "sdxl", fmt="diffusers")          # SDXL diffusers folder
    vae = make_tiny_vae_file(tmp_path / "vae.safetensors")              # a separate VAE in A1111 layout

Single files are `.safetensors` with a metadata-free header, the way A1111 and most model sites ship them. Their
names carry the variant (`tiny-sd15.safetensors`); SD 2.x 512/768 files say so in the name, as the real ones do,
because nothing else in such a file tells the two apart.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from sdcore.models import DiffusionModel, ModelFamily

__all__ = ["build_tiny_model", "get_family", "make_tiny_model", "make_tiny_vae_file", "tiny_model_name"]


@functools.cache
def _families() -> dict[str, ModelFamily]:
    from sdcore.families import collect_families
    from sdcore.plugins import make_plugin_manager

    registry = collect_families(make_plugin_manager())
    return dict(registry.items())


def get_family(name: str) -> ModelFamily:
    """The registered model family `name` (e.g. "sd1", "sdxl")."""
    families = _families()
    if name not in families:
        known = ", ".join(families) or "none"
        raise ValueError(f"no model family {name!r} is registered (registered: {known}); is its plugin installed?")
    family = families[name]
    if not hasattr(family, "build_tiny"):
        raise ValueError(f"the model family {name!r} cannot build tiny test models (no build_tiny method)")
    return family


def _default_variant(family: Any) -> str:
    variants = getattr(family, "variants", None)
    if not variants:
        raise ValueError(f"the model family {family.name!r} lists no variants; pass variant=")
    return str(variants[0])


def tiny_model_name(family: str = "sd1", variant: str | None = None, seed: int = 0) -> str:
    """The file stem `make_tiny_model` uses, e.g. `tiny-sd15`, `tiny-sd2-768-v`, `tiny-sdxl-base-seed3`."""
    fam = get_family(family)
    variant = variant or _default_variant(fam)
    namer = getattr(fam, "tiny_name", None)
    stem = namer(variant) if callable(namer) else f"tiny-{variant}"
    return stem if seed == 0 else f"{stem}-seed{seed}"


def build_tiny_model(
    family: str = "sd1", variant: str | None = None, seed: int = 0, dtype: str = "float32"
) -> DiffusionModel:
    """A tiny random-weight model in memory (real block layout, tiny widths), deterministic for a seed."""
    fam = get_family(family)
    return fam.build_tiny(variant or _default_variant(fam), seed=seed, dtype=dtype)  # type: ignore[attr-defined]


def make_tiny_model(
    directory: Path,
    family: str = "sd1",
    variant: str | None = None,
    fmt: Literal["diffusers", "single_file"] = "single_file",
    seed: int = 0,
) -> Path:
    """Build a tiny model and write it into `directory`; returns the `.safetensors` file or the folder.

    `fmt="single_file"`: original LDM/SGM keys (`model.diffusion_model.*`, ...), no safetensors metadata.
    `fmt="diffusers"`: a diffusers folder with `model_index.json`, component configs, weights and tokenizers.
    """
    from safetensors.torch import save_file

    fam = get_family(family)
    variant = variant or _default_variant(fam)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = fam.build_tiny(variant, seed=seed)  # type: ignore[attr-defined]
    stem = tiny_model_name(family, variant, seed)
    if fmt == "single_file":
        path = directory / f"{stem}.safetensors"
        save_file(model.to_single_file_state_dict(), str(path))
        return path
    if fmt == "diffusers":
        path = directory / stem
        saver = getattr(fam, "save_diffusers", None)
        if callable(saver):
            saver(model, path)
        else:
            model.save_diffusers(path)  # type: ignore[attr-defined]
        return path
    raise ValueError(f"fmt must be 'single_file' or 'diffusers', not {fmt!r}")


def make_tiny_vae_file(
    path: Path, family: str = "sd1", seed: int = 1, layout: Literal["ldm", "diffusers"] = "ldm"
) -> Path:
    """Write the VAE of a tiny model (default seed 1, so it differs from a seed-0 model's VAE) as a separate file.

    `layout="ldm"`: A1111 VAE-file keys (`encoder.down.0.block.0...`, `decoder.up...`, `quant_conv`);
    `layout="diffusers"`: `AutoencoderKL` state-dict keys. `path` may be a folder (the file is named for you).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_dir() or not path.suffix:
        path.mkdir(parents=True, exist_ok=True)
        path = path / f"tiny-{family}-vae{'' if layout == 'ldm' else '-diffusers'}-seed{seed}.safetensors"
    model = build_tiny_model(family, seed=seed)
    if layout == "ldm":
        prefix = "first_stage_model."
        state = {k[len(prefix):]: v for k, v in model.to_single_file_state_dict().items() if k.startswith(prefix)}
    elif layout == "diffusers":
        state = {k: v.detach().clone() for k, v in model.vae.state_dict().items()}
    else:
        raise ValueError(f"layout must be 'ldm' or 'diffusers', not {layout!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path
