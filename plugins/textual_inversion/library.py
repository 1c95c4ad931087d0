"""Finding, reading and fitting textual-inversion embeddings (A1111 formats).

Folders searched, in order: `$SDCORE_EMBEDDING_DIRS` (`os.pathsep`-separated), `<model dir>/embeddings` for
each of the engine's `model_dirs`, and `~/.local/share/sdcore/embeddings` (subfolders included). An
embedding's name is its file name without the suffix; when two files have the same name, the first found
wins.

Formats, read as A1111's `create_embedding_from_data` reads them:
- `.pt` / `.bin`: `{"string_to_param": {"*": tensor [n, width]}, "name": ..., "step": ..., ...}`, loaded with
  `torch.load(weights_only=True)` (plain dicts of tensors, strings and numbers only);
- `.safetensors`: `{"emb_params": tensor [n, width]}` (SD 1.x/2.x) or `{"clip_l": [n, 768], "clip_g": [n, 1280]}`
  (SDXL); any file holding exactly one tensor (a diffusers concept) is read as the single-tensor form.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdcore.errors import InvalidRequest

log = logging.getLogger("sdcore.textual_inversion")

SUFFIXES = (".pt", ".bin", ".safetensors")
DEFAULT_DIR = Path("~/.local/share/sdcore/embeddings")
ENV_VAR = "SDCORE_EMBEDDING_DIRS"
SINGLE = ""  # key of the one tensor of an SD 1.x/2.x-style embedding
FAMILY_BY_WIDTH = {768: "sd1", 1024: "sd2"}


class EmbeddingError(InvalidRequest):
    """An embedding file that cannot be read, or that does not fit the model."""


@dataclass
class Embedding:
    """One embedding file: `tensors` is `{"": [n, width]}` (SD 1.x/2.x form) or `{"clip_l": ..., "clip_g": ...}`."""

    name: str
    path: Path
    tensors: dict[str, Any]
    step: Any = None
    sd_checkpoint: Any = None
    sd_checkpoint_name: Any = None
    _fits: dict[tuple[tuple[str, int], ...], dict[str, Any]] = field(default_factory=dict, repr=False)

    @property
    def vectors(self) -> int:
        return int(next(iter(self.tensors.values())).shape[0])

    @property
    def widths(self) -> dict[str, int]:
        return {key: int(t.shape[-1]) for key, t in self.tensors.items()}

    @property
    def shape(self) -> int:
        """A1111's `shape`: the width, summed over clip_l and clip_g for SDXL."""
        return sum(self.widths.values())

    @property
    def family(self) -> str | None:
        if SINGLE in self.tensors:
            return FAMILY_BY_WIDTH.get(self.shape)
        return "sdxl"

    def describe_width(self) -> str:
        if SINGLE in self.tensors:
            return f"width {self.shape}"
        return ", ".join(f"{k} width {w}" for k, w in self.widths.items())

    def fit(self, widths: dict[str, int]) -> dict[str, Any] | str:
        """`{encoder_name: tensor}` for a model whose text encoders have `widths`, or why it does not fit."""
        key = tuple(sorted(widths.items()))
        cached = self._fits.get(key)
        if cached is not None:
            return cached
        model = ", ".join(f"{k} width {w}" for k, w in widths.items()) or "no text encoder"
        if not widths:
            return f"the model has {model}"
        if SINGLE in self.tensors:
            (encoder, width), tensor = (next(iter(widths.items())), self.tensors[SINGLE])
            if len(widths) != 1:
                return (f"it is a single-encoder (SD 1.x/2.x) embedding of width {self.shape}; this model needs "
                        f"vectors for {model}")
            if int(tensor.shape[-1]) != width:
                return f"its vectors have width {self.shape}; this model's text encoder takes {model}"
            result = {encoder: tensor}
        else:
            missing = [k for k in widths if k not in self.tensors]
            if missing:
                return f"it has vectors for {self.describe_width()}; this model needs {model}"
            wrong = [k for k, w in widths.items() if int(self.tensors[k].shape[-1]) != w]
            if wrong:
                return f"its vectors have {self.describe_width()}; this model's text encoders take {model}"
            result = {k: self.tensors[k] for k in widths}
        self._fits[key] = result
        return result


# --- folders ------------------------------------------------------------------------------------------------


def embedding_dirs(engine: Any | None = None, extra: Any = ()) -> list[Path]:
    dirs: list[Path] = []
    for part in os.environ.get(ENV_VAR, "").split(os.pathsep):
        if part.strip():
            dirs.append(Path(part.strip()).expanduser())
    for folder in [*(getattr(engine, "model_dirs", None) or ()), *extra]:
        dirs.append(Path(folder).expanduser() / "embeddings")
    dirs.append(DEFAULT_DIR.expanduser())
    seen: list[Path] = []
    for d in dirs:
        if d not in seen:
            seen.append(d)
    return seen


def available(engine: Any | None = None, extra: Any = ()) -> dict[str, Path]:
    """`{name: path}` of every embedding file in the folders (first found wins), A1111's walk order."""
    found: dict[str, Path] = {}
    for folder in embedding_dirs(engine, extra):
        if not folder.is_dir():
            continue
        for root, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames.sort()
            for filename in sorted(filenames):
                path = Path(root) / filename
                if path.suffix.lower() not in SUFFIXES:
                    continue
                try:
                    if path.stat().st_size == 0:
                        continue
                except OSError:
                    continue
                found.setdefault(path.stem, path)
    return found


# --- reading ------------------------------------------------------------------------------------------------


def _read_raw(path: Path) -> Any:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise EmbeddingError(f"Embedding {path} is not a readable .safetensors file: {exc}") from None
    import pickle

    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise EmbeddingError(
            f"Embedding {path} holds Python objects other than tensors, strings and numbers, so sdcore does not "
            f"load it (torch.load weights_only). A1111 .pt embeddings hold only those; convert this file to "
            f".safetensors ({{'emb_params': tensor}}). Details: {str(exc).splitlines()[0]}"
        ) from None
    except Exception as exc:
        raise EmbeddingError(f"Embedding {path} cannot be read: {exc}") from None


def read_embedding(path: Path) -> Embedding:
    """Read an embedding file (no caching); raises `EmbeddingError` for anything that is not an embedding."""
    import torch

    path = Path(path)
    data = _read_raw(path)
    if not isinstance(data, dict):
        raise EmbeddingError(f"Embedding {path} holds a {type(data).__name__}, not a dict of tensors.")

    def tensor(value: Any, what: str) -> Any:
        if not isinstance(value, torch.Tensor) or value.dim() not in (1, 2) or value.numel() == 0:
            raise EmbeddingError(f"Embedding {path}: {what} is not a [vectors, width] tensor.")
        value = value.detach().to(device="cpu", dtype=torch.float32)
        return (value.unsqueeze(0) if value.dim() == 1 else value).contiguous()

    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError(f"Embedding {path}: string_to_param must hold exactly one tensor.")
        tensors = {SINGLE: tensor(next(iter(params.values())), "string_to_param")}
    elif "clip_l" in data and "clip_g" in data:
        tensors = {"clip_l": tensor(data["clip_l"], "clip_l"), "clip_g": tensor(data["clip_g"], "clip_g")}
        if tensors["clip_l"].shape[0] != tensors["clip_g"].shape[0]:
            raise EmbeddingError(f"Embedding {path}: clip_l and clip_g have different numbers of vectors.")
    elif len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        tensors = {SINGLE: tensor(next(iter(data.values())), next(iter(data)))}
    else:
        keys = ", ".join(sorted(map(str, data))[:8])
        raise EmbeddingError(
            f"Embedding {path} is neither an A1111 embedding (string_to_param, emb_params, clip_l+clip_g) nor a "
            f"diffusers concept (keys: {keys})."
        )
    meta = {k: data.get(k) for k in ("step", "sd_checkpoint", "sd_checkpoint_name")}
    meta = {k: (v if isinstance(v, (str, int, float)) or v is None else None) for k, v in meta.items()}
    return Embedding(name=path.stem, path=path, tensors=tensors, **meta)


_cache: OrderedDict[tuple[str, int, int], Embedding] = OrderedDict()
_hashes: dict[tuple[str, int, int], str] = {}
_lock = threading.Lock()
CACHE_SIZE = 512


def file_key(path: Path) -> tuple[str, int, int]:
    stat = Path(path).stat()
    return (str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


def load_embedding(path: Path, key: tuple[str, int, int] | None = None) -> Embedding:
    """`read_embedding`, cached by path, modification time and size."""
    try:
        key = key or file_key(path)
    except OSError:
        raise EmbeddingError(f"Embedding file {path} does not exist.") from None
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            if hit.path == Path(path):
                return hit
    embedding = read_embedding(Path(path))
    with _lock:
        _cache[key] = embedding
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return embedding


def short_hash(path: Path) -> str:
    """A1111's TI hash (first 12 hex of the whole file's SHA-256), cached by path, mtime and size."""
    from sdcore.hashing import embedding_short_hash

    key = file_key(path)
    with _lock:
        hit = _hashes.get(key)
    if hit is None:
        hit = embedding_short_hash(path)
        with _lock:
            _hashes[key] = hit
    return hit


def describe(path: Path) -> dict[str, Any]:
    """Facts for `sdcore embeddings`: name, path, vectors, family, width, hash."""
    info: dict[str, Any] = {"name": path.stem, "path": str(path)}
    try:
        emb = load_embedding(path)
    except EmbeddingError as exc:
        info["error"] = str(exc)
        return info
    widths = emb.widths
    info.update(
        vectors=emb.vectors, family=emb.family,
        width=widths[SINGLE] if SINGLE in widths else widths,
        shape=emb.shape, step=emb.step, sd_checkpoint_name=emb.sd_checkpoint_name,
        hash=short_hash(path),
    )
    return info


# --- models -------------------------------------------------------------------------------------------------


def _width(encoder: Any) -> int | None:
    try:
        return int(encoder.get_input_embeddings().embedding_dim)
    except Exception:
        config = getattr(encoder, "config", None)
        return int(config.hidden_size) if getattr(config, "hidden_size", None) else None


def model_widths(model: Any) -> dict[str, int]:
    """`{encoder_name: input width}` of the model's text encoders ("clip_l"/"clip_h", or "clip_l"+"clip_g")."""
    pairs: list[tuple[str, Any]] = []
    if hasattr(model, "text_encoder_2"):
        pairs = [("clip_l", getattr(model, "text_encoder", None)), ("clip_g", model.text_encoder_2)]
    elif getattr(model, "encoder_name", None):
        pairs = [(model.encoder_name, getattr(model, "text_encoder", None))]
    widths = {}
    for name, encoder in pairs:
        width = _width(encoder) if encoder is not None else None
        if width:
            widths[name] = width
    return widths


def misfit_error(emb: Embedding, reason: str) -> EmbeddingError:
    return EmbeddingError(
        f"The embedding {emb.name!r} ({emb.path}) does not fit this model: {reason}. It was made for another "
        "model family; remove it from the prompt or use a model it was trained for."
    )
