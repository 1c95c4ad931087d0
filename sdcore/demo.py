"""The demo model that ships inside the package, used when no model is given.

`sdcore-demo.safetensors` is a tiny SD 1.x-layout model (single file, original LDM keys, fp16) that draws simple
shapes: "a small red circle at the top left on a white background". Its architecture is not a standard SD 1.x
one (tiny widths), so its diffusers config folder (`config/`: model_index.json, unet/vae/text_encoder/scheduler
configs, no weights) ships next to it and is passed as the load's `config`, like `--config` for any
non-standard community checkpoint. `loras/night.safetensors` is a kohya-layout LoRA trained on it with
`sdcore train lora` (shapes "on a night background"). `docs/demo-model.md` says how both were trained.
"""

from __future__ import annotations

import os
from pathlib import Path

DEMO_DIR = Path(__file__).parent / "data" / "demo"
DEMO_MODEL_FILE = DEMO_DIR / "sdcore-demo.safetensors"
DEMO_CONFIG_DIR = DEMO_DIR / "config"
DEMO_LORA_DIR = DEMO_DIR / "loras"  # add it to $SDCORE_LORA_DIRS for `<lora:night:1>`
DEMO_LORA_FILE = DEMO_LORA_DIR / "night.safetensors"
DEMO_SIZE = 64  # native image size in pixels


def demo_model_path() -> Path | None:
    """The shipped demo checkpoint, or None when this build has none."""
    return DEMO_MODEL_FILE if DEMO_MODEL_FILE.is_file() else None


def demo_model_config() -> Path | None:
    """The demo model's diffusers config folder, or None when this build has none."""
    return DEMO_CONFIG_DIR if (DEMO_CONFIG_DIR / "model_index.json").is_file() else None


def demo_lora_path() -> Path | None:
    """The shipped demo LoRA (night backgrounds), or None."""
    return DEMO_LORA_FILE if DEMO_LORA_FILE.is_file() else None


def is_demo_model(location: str | os.PathLike[str] | None) -> bool:
    """Whether `location` is the shipped demo checkpoint (by path, however it is spelled)."""
    if not location:
        return False
    try:
        return Path(location).expanduser().resolve() == DEMO_MODEL_FILE.resolve()
    except OSError:
        return False


def demo_config_for(location: str | os.PathLike[str] | None) -> str | None:
    """The config folder to load `location` with when it is the demo model (else None).

    The engine calls this when a request gives no `config`, so the demo model loads through the ordinary
    single-file path with its shipped config folder.
    """
    if is_demo_model(location):
        folder = demo_model_config()
        return str(folder) if folder is not None else None
    return None
