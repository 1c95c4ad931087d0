"""The demo model that ships inside the package, used when no model is given."""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL_FILE = Path(__file__).parent / "data" / "demo" / "sdcore-demo.safetensors"


def demo_model_path() -> Path | None:
    """The shipped demo checkpoint, or None when this build has none."""
    return DEMO_MODEL_FILE if DEMO_MODEL_FILE.is_file() else None
