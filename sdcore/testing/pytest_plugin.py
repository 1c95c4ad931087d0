"""sdcore's pytest plugin (entry point `pytest11`): tiny models and engines for plugin authors' tests.

Fixtures:
- `tiny_sd1_model`, `tiny_sdxl_model`: paths of tiny single-file checkpoints (real SD 1.x / SDXL block layouts,
  tiny widths, random weights), built once per test session in seconds on CPU.
- `tiny_sd1_folder`: the same SD 1.x model as a diffusers folder.
- `sdcore_engine`: an `Engine` on the CPU whose default model is `tiny_sd1_model`, closed after the test.

The plugin sets `HF_HUB_OFFLINE=1` so that anything reaching for the network fails at once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    config.addinivalue_line("markers", "slow: takes more than a few seconds; deselect with -m 'not slow'")


@pytest.fixture(scope="session")
def sdcore_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sdcore-models")


@pytest.fixture(scope="session")
def tiny_sd1_model(sdcore_model_dir: Path) -> Path:
    from .models import make_tiny_model

    return make_tiny_model(sdcore_model_dir, family="sd1", fmt="single_file")


@pytest.fixture(scope="session")
def tiny_sd1_folder(sdcore_model_dir: Path) -> Path:
    from .models import make_tiny_model

    return make_tiny_model(sdcore_model_dir, family="sd1", fmt="diffusers")


@pytest.fixture(scope="session")
def tiny_sdxl_model(sdcore_model_dir: Path) -> Path:
    from .models import make_tiny_model

    return make_tiny_model(sdcore_model_dir, family="sdxl", fmt="single_file")


@pytest.fixture
def sdcore_engine(tiny_sd1_model: Path) -> Iterator[Any]:
    from sdcore import Engine

    engine = Engine(device="cpu", default_model=tiny_sd1_model)
    try:
        yield engine
    finally:
        engine.close()
