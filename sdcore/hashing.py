"""The file hashes A1111 writes into infotexts, computed the same way, and cached.

A1111 and Civitai identify models by hashes in the infotext, so sdcore computes the same ones:

| infotext key            | what it is                                                    | function              |
| ----------------------- | ------------------------------------------------------------- | --------------------- |
| `Model hash`            | "AutoV2": first 10 hex digits of the SHA-256 of the file       | `model_hash`          |
| `VAE hash`              | the same, of the VAE file                                      | `vae_hash`            |
| (old infotexts)         | first 8 hex of SHA-256 of 64 KiB at offset 1 MiB              | `legacy_model_hash`   |
| `Lora hashes`           | first 12 hex of kohya's "addnet" hash (tensor bytes only)     | `lora_short_hash`     |
| `TI hashes`             | first 12 hex of the SHA-256 of the embedding file             | `embedding_short_hash`|

Civitai looks models up by the full SHA-256 (`sha256_file`) and by these short forms.

Hashing a multi-GB checkpoint takes seconds to minutes, so full-file hashes are cached in a JSON file
(`$SDCORE_CACHE_DIR/hashes.json`, else `~/.cache/sdcore/hashes.json`) keyed by the resolved path, size and
modification time in nanoseconds: a file is hashed once, and again only when it changes. The cache is an
optimisation only: a cache that cannot be read or written is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from sdcore.errors import CheckpointError, ModelNotFound

__all__ = [
    "WEIGHT_SUFFIXES",
    "addnet_hash_safetensors",
    "cache_path",
    "embedding_short_hash",
    "legacy_model_hash",
    "lora_hash",
    "lora_short_hash",
    "model_hash",
    "sha256_file",
    "vae_hash",
]

_BLOCK = 1024 * 1024
_CACHE_VERSION = 1

WEIGHT_SUFFIXES: tuple[str, ...] = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".gguf")
"""Files counted as weights when hashing a diffusers folder."""

_cache_lock = threading.Lock()
_key_locks: dict[tuple[str, str], threading.Lock] = {}


def cache_path() -> Path:
    """Where the hash cache lives: `$SDCORE_CACHE_DIR/hashes.json`, else `~/.cache/sdcore/hashes.json`."""
    base = os.environ.get("SDCORE_CACHE_DIR")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "sdcore"
    return root / "hashes.json"


def _load_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION:
        return {}
    return data


def _cached(kind: str, key: str, stamp: dict[str, int]) -> str | None:
    with _cache_lock:
        entry = _load_cache(cache_path()).get(kind, {}).get(key)
    if (
        isinstance(entry, dict)
        and entry.get("size") == stamp["size"]
        and entry.get("mtime_ns") == stamp["mtime_ns"]
    ):
        digest = entry.get("sha256")
        if isinstance(digest, str) and len(digest) == 64:
            return digest
    return None


def _store(kind: str, key: str, stamp: dict[str, int], digest: str) -> None:
    """Add one entry; re-reads the file first so entries written by other processes are kept.

    The new file is written under a temporary name and renamed over the old one, so a reader never sees
    half a file. Any failure (read-only home, full disk) is ignored: the cache only saves time.
    """
    path = cache_path()
    with _cache_lock:
        try:
            data = _load_cache(path)
            data["version"] = _CACHE_VERSION
            data.setdefault(kind, {})[key] = {**stamp, "sha256": digest}
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            try:
                tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _key_lock(kind: str, key: str) -> threading.Lock:
    """One lock per file and hash kind, so two threads asking for one big file hash it only once."""
    with _cache_lock:
        return _key_locks.setdefault((kind, key), threading.Lock())


def _existing_file(path: Path | str) -> Path:
    path = Path(path)
    if not path.exists():
        raise ModelNotFound(f"cannot hash {path}: there is no such file; check the path")
    if not path.is_file():
        raise CheckpointError(f"cannot hash {path}: it is not a regular file")
    return path


def _digest_stream(handle: BinaryIO) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: handle.read(_BLOCK), b""):
        digest.update(block)
    return digest.hexdigest()


def _sha256_all(path: Path) -> str:
    with open(path, "rb") as handle:
        return _digest_stream(handle)


def _sha256_after_header(path: Path) -> str:
    """kohya's "addnet" hash: SHA-256 of everything after the safetensors header (the tensor bytes).

    Because the JSON header (with its `__metadata__`) is skipped, editing a LoRA's metadata does not change
    this hash, which is why kohya and A1111 identify LoRAs by it.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        if header_len < 0 or header_len + 8 > size:
            raise CheckpointError(
                f"{path} is not a safetensors file (its header length does not fit the file); "
                "the addnet hash needs a .safetensors file"
            )
        handle.seek(8 + header_len)
        return _digest_stream(handle)


def _cached_hash(kind: str, path: Path | str, compute: Callable[[Path], str], use_cache: bool) -> str:
    file = _existing_file(path)
    key = str(file.resolve())
    if not use_cache:
        return compute(file)
    with _key_lock(kind, key):
        st = file.stat()
        stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        cached = _cached(kind, key, stamp)
        if cached is not None:
            return cached
        digest = compute(file)
        # Only cache if the file did not change while it was being read.
        st_after = file.stat()
        if (st_after.st_size, st_after.st_mtime_ns) == (st.st_size, st.st_mtime_ns):
            _store(kind, key, stamp, digest)
        return digest


def sha256_file(path: Path | str, *, use_cache: bool = True) -> str:
    """The full SHA-256 of a file as 64 lower-case hex digits, cached by path, size and mtime.

    This is A1111's `sha256` (what `/sdapi/v1/sd-models` reports) and what Civitai looks models up by. The
    cache makes repeated calls on a multi-GB checkpoint instant; it is safe to call from several threads.
    """
    return _cached_hash("sha256", path, _sha256_all, use_cache)


def addnet_hash_safetensors(path: Path | str, *, use_cache: bool = True) -> str:
    """kohya's "addnet" SHA-256 of a `.safetensors` file: the bytes after the header, 64 hex digits.

    A1111 uses it for LoRA files in `Lora hashes` (short form: `lora_short_hash`). Raises `CheckpointError`
    for a file that is not safetensors.
    """
    return _cached_hash("addnet", path, _sha256_after_header, use_cache)


def model_hash(path: Path | str) -> str:
    """A1111's `Model hash` ("AutoV2"): the first 10 hex digits of the file's SHA-256.

    For a diffusers folder (which A1111 cannot load, and so has no hash for) this gives a stable 10-hex
    value of sdcore's own: the SHA-256 of the sorted list of `relative/path<NUL>sha256-of-file` lines of
    every weight file in the folder (`WEIGHT_SUFFIXES`), so the same folder has the same hash anywhere and
    any change to a weight file changes it. Such a hash will not match anything on Civitai.
    """
    path = Path(path)
    if path.is_dir():
        return _folder_hash(path)[:10]
    return sha256_file(path)[:10]


def _folder_hash(folder: Path) -> str:
    files = sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(WEIGHT_SUFFIXES)),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not files:
        raise CheckpointError(
            f"cannot hash the folder {folder}: it holds no weight files ({', '.join(WEIGHT_SUFFIXES)}); "
            "give a diffusers model folder or a checkpoint file"
        )
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(folder).as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def vae_hash(path: Path | str) -> str:
    """A1111's `VAE hash`: the first 10 hex digits of the VAE file's SHA-256 (same rule as `model_hash`)."""
    return model_hash(path)


def legacy_model_hash(path: Path | str) -> str:
    """A1111's old 8-hex model hash (before AutoV2; seen in old infotexts as `Model hash: 45dee52b`).

    It is the SHA-256 of only the 64 KiB at offset 1 MiB, so different models can share it. As in A1111,
    a file shorter than 1 MiB hashes no bytes at all and gives `e3b0c442` (the hash of nothing). It is not
    cached: it reads 64 KiB. A folder has no legacy hash (`CheckpointError`).
    """
    file = _existing_file(path)
    with open(file, "rb") as handle:
        handle.seek(0x100000)
        return hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]


def _safetensors_metadata(path: Path) -> dict[str, Any]:
    """The `__metadata__` of a safetensors header, or {} when it has none or cannot be read."""
    try:
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            if header_len <= 0 or header_len > 100 * 1024 * 1024:
                return {}
            header = json.loads(handle.read(header_len))
    except (OSError, ValueError):
        return {}
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def lora_hash(path: Path | str) -> str:
    """The full hash A1111 keeps for a LoRA file (its `Lora hashes` entry is the first 12 digits).

    As in A1111's LoRA extension: a `.safetensors` file that carries kohya's precomputed `sshs_model_hash`
    in its metadata uses that; otherwise a `.safetensors` file gets the addnet hash and any other file the
    SHA-256 of the whole file.
    """
    file = _existing_file(path)
    if file.suffix.lower() == ".safetensors":
        precomputed = _safetensors_metadata(file).get("sshs_model_hash")
        if isinstance(precomputed, str) and precomputed:
            return precomputed
        return addnet_hash_safetensors(file)
    return sha256_file(file)


def lora_short_hash(path: Path | str) -> str:
    """The LoRA hash A1111 writes in `Lora hashes: "name: 0123456789ab"`: first 12 hex of `lora_hash`."""
    return lora_hash(path)[:12]


def embedding_short_hash(path: Path | str) -> str:
    """The textual-inversion hash A1111 writes in `TI hashes`: the first 12 hex of the file's SHA-256.

    Unlike LoRAs, embeddings are hashed whole (header and all), whatever their format.
    """
    return sha256_file(path)[:12]
