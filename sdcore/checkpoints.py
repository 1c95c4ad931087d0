"""Finding out what a model location is, without trusting it.

A location is a single-file checkpoint (`.safetensors`, or a pickle file with opt-in), a diffusers folder, or a
hub id. `inspect_model` reads only what detection needs: a safetensors header (names, shapes, metadata; no
tensor data), a folder's `model_index.json`. Model families then decide from that whether they claim the model.

Pickle files (`.ckpt`, `.pt`, `.pth`, `.bin`) can run arbitrary code when unpickled, so they are refused unless
the caller opts in, and even then loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import CheckpointError, ModelNotFound, UnsafeCheckpoint, WrongModelType

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
SAFETENSORS_SUFFIXES = {".safetensors", ".sft"}
# A safetensors header this large is a corrupt length field, not a real checkpoint (real ones are < 10 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

SourceKind = Literal["single_file", "diffusers", "hub"]


@dataclass
class ModelSource:
    """What a model location turned out to be. Families read `keys` (single files) or `model_index` (folders)."""

    location: str
    kind: SourceKind
    path: Path | None = None
    keys: dict[str, tuple[int, ...]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    model_index: dict[str, Any] | None = None
    # Pickle checkpoints are read once, at inspection, because their keys cannot be listed without loading.
    state_dict: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        """A1111's "Model" infotext value: the file name without extension, or the folder/hub name."""
        if self.path is not None:
            return self.path.stem if self.kind == "single_file" else self.path.name
        return self.location.rsplit("/", 1)[-1]

    def has_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.keys)

    def shape(self, key: str) -> tuple[int, ...] | None:
        return self.keys.get(key)


def read_safetensors_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Names and shapes of the tensors in a safetensors file, and its `__metadata__`, checking the file is whole."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (only {size} bytes). Download it again.")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES or header_len + 8 > size:
            raise CheckpointError(
                f"{path} is truncated or not a safetensors file (its header claims {header_len} bytes, "
                f"the file has {size}). Download it again."
            )
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} has a corrupt safetensors header ({exc}). Download it again.") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header. Download it again.")
    metadata = header.pop("__metadata__", None) or {}
    keys: dict[str, tuple[int, ...]] = {}
    data_end = 0
    for name, info in header.items():
        try:
            keys[name] = tuple(int(d) for d in info["shape"])
            data_end = max(data_end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise CheckpointError(f"{path} has a corrupt entry for tensor {name!r}. Download it again.") from None
    expected = 8 + header_len + data_end
    if size < expected:
        raise CheckpointError(
            f"{path} is truncated: it should be {expected} bytes but is {size}. Download it again."
        )
    return keys, {str(k): str(v) for k, v in metadata.items()}


def load_pickle_state_dict(path: Path) -> dict[str, Any]:
    """Load a pickle checkpoint with `weights_only=True`; unwrap Lightning's `state_dict` nesting."""
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad pickles
        raise CheckpointError(
            f"{path} could not be loaded safely ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
            "It may contain code or objects other than tensors; convert it to .safetensors with a trusted tool."
        ) from None
    while isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not contain a state dict of tensors.")
    return data


def guess_file_kind(keys: dict[str, tuple[int, ...]] | list[str]) -> str | None:
    """Recognise files that are valid checkpoints but not models, so the error can say what the file is."""
    names = list(keys)
    if not names:
        return "empty file"
    if any(k.startswith(("lora_unet_", "lora_te", "lycoris_")) or ".lora_down." in k or ".lora_A." in k
           or ".hada_w1_a" in k or ".lokr_w1" in k for k in names):
        return "LoRA"
    if any(k in ("emb_params", "string_to_param", "clip_l", "clip_g") for k in names):
        return "textual inversion embedding"
    has_vae = any(k.startswith(("encoder.", "decoder.", "first_stage_model.")) for k in names)
    has_unet = any(k.startswith(("model.diffusion_model.", "down_blocks.", "conv_in.")) for k in names)
    if has_vae and not has_unet:
        return "VAE"
    if any(k.startswith(("control_model.", "controlnet_")) for k in names):
        return "ControlNet"
    return None


def inspect_model(location: str | os.PathLike[str], *, allow_pickle: bool = False) -> ModelSource:
    """Work out what `location` is. Raises a typed error with advice when it cannot be a model."""
    text = os.fspath(location)
    path = Path(text).expanduser()
    if path.is_dir():
        index_file = path / "model_index.json"
        if not index_file.is_file():
            raise ModelNotFound(
                f"{path} is a folder but not a diffusers model (no model_index.json). "
                "Point to the folder that holds model_index.json, or to a .safetensors file."
            )
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{index_file} is not valid JSON ({exc}).") from None
        return ModelSource(location=text, kind="diffusers", path=path.resolve(), model_index=index)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise UnsafeCheckpoint(
                    f"{path.name} is a pickle checkpoint, which can run code when loaded. Convert it to "
                    ".safetensors, or pass --allow-pickle (allow_pickle=True) to load it with weights_only=True."
                )
            state = load_pickle_state_dict(path)
            keys = {k: tuple(getattr(v, "shape", ())) for k, v in state.items()}
            return ModelSource(location=text, kind="single_file", path=path.resolve(), keys=keys, state_dict=state)
        if suffix in SAFETENSORS_SUFFIXES or suffix == "":
            keys, metadata = read_safetensors_header(path)
            return ModelSource(location=text, kind="single_file", path=path.resolve(), keys=keys, metadata=metadata)
        raise CheckpointError(
            f"{path.name}: unsupported file type {suffix!r}. Use a .safetensors checkpoint or a diffusers folder."
        )
    if HUB_ID.match(text) and not text.startswith((".", "/")) and not path.suffix:
        return ModelSource(location=text, kind="hub")
    raise ModelNotFound(f"Model {text!r} not found: no such file or folder. Check the path.")


def ensure_model_file(source: ModelSource) -> None:
    """Raise `WrongModelType` when a single file is clearly a LoRA, VAE, embedding or ControlNet."""
    if source.kind != "single_file":
        return
    kind = guess_file_kind(source.keys)
    if kind is not None:
        raise WrongModelType(
            f"{source.path} is a {kind}, not a Stable Diffusion model. "
            + {
                "LoRA": "Use it with <lora:name:weight> in the prompt or the lora option.",
                "VAE": "Pass it as the VAE (--vae) next to a model.",
                "textual inversion embedding": "Put it in the embeddings folder and use its name in the prompt.",
            }.get(kind, "Pass a full model checkpoint instead.")
        )


def load_state_dict(source: ModelSource, device: str = "cpu") -> dict[str, Any]:
    """All tensors of a single-file source (already in memory for pickle files)."""
    if source.state_dict is not None:
        return source.state_dict
    assert source.path is not None
    from safetensors.torch import load_file

    try:
        return load_file(str(source.path), device=device)
    except Exception as exc:  # noqa: BLE001 - safetensors raises SafetensorError for any corruption
        raise CheckpointError(f"{source.path} could not be read ({exc}). Download it again.") from None
