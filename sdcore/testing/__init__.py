"""Test helpers for sdcore and its plugins: tiny models in real on-disk formats (see `sdcore.testing.models`).

The pytest plugin (`sdcore.testing.pytest_plugin`, entry point `pytest11`) builds fixtures from these.
"""

from .models import build_tiny_model, get_family, make_tiny_model, make_tiny_vae_file, tiny_model_name

__all__ = ["build_tiny_model", "get_family", "make_tiny_model", "make_tiny_vae_file", "tiny_model_name"]
