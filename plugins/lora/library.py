"""Finding LoRA files by name, caching parsed files, and listing them.

Folders searched, in order: `$SDCORE_LORA_DIRS` (`os.pathsep`-separated), `<model dir>/loras` and
`<model dir>/Lora` for each of the engine's `model_dirs`, and `~/.local/share/sdcore/loras`.
A name may also be a path to a file.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from .formats import LoraError, LoraFile, read_lora_file

SUFFIXES = (".safetensors", ".pt", ".ckpt")
DEFAULT_DIR = Path("~/.local/share/sdcore/loras")


def lora_dirs(engine: Any | None = None) -> list[Path]:
    dirs: list[Path] = []
    for part in os.environ.get("SDCORE_LORA_DIRS", "").split(os.pathsep):
        if part.strip():
            dirs.append(Path(part.strip()).expanduser())
    for folder in getattr(engine, "model_dirs", None) or ():
        dirs.extend([Path(folder) / "loras", Path(folder) / "Lora"])
    dirs.append(DEFAULT_DIR.expanduser())
    seen: list[Path] = []
    for d in dirs:
        if d not in seen:
            seen.append(d)
    return seen


def find_lora(name: str, engine: Any | None = None) -> Path:
    """The file of LoRA `name` (a file name, a stem, a path relative to a LoRA folder, or a path)."""
    direct = Path(name).expanduser()
    if direct.is_file():
        return direct
    folders = lora_dirs(engine)
    for folder in folders:
        for candidate in [folder / name, *(folder / f"{name}{s}" for s in SUFFIXES)]:
            if candidate.is_file():
                return candidate
    # a file in a subfolder, found by its stem (A1111 looks LoRAs up by name anywhere in its folder)
    for folder in folders:
        if folder.is_dir():
            for suffix in SUFFIXES:
                for candidate in sorted(folder.rglob(f"{name}{suffix}")):
                    return candidate
    where = ", ".join(str(f) for f in folders)
    raise LoraError(
        f"LoRA {name!r} not found. Searched: {where}. Put the file in one of these folders, add a folder to "
        "SDCORE_LORA_DIRS, or give its path."
    )


def available(engine: Any | None = None) -> list[Path]:
    found: dict[str, Path] = {}
    for folder in lora_dirs(engine):
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in SUFFIXES and path.is_file():
                found.setdefault(path.stem, path)
    return list(found.values())


_cache: OrderedDict[tuple[str, int, int], LoraFile] = OrderedDict()
_cache_lock = threading.Lock()
CACHE_SIZE = 16


def load_lora(path: Path) -> LoraFile:
    """Parse `path`, cached by path, size and modification time (so switching costs only the merge)."""
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except OSError:
        raise LoraError(f"LoRA file {path} does not exist.") from None
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    lora = read_lora_file(path)
    with _cache_lock:
        _cache[key] = lora
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return lora


def describe(path: Path) -> dict[str, Any]:
    """Facts for `sdcore loras`: name, path, family guess, kinds, rank, module count, hashes."""
    from sdcore.hashing import lora_hash

    info: dict[str, Any] = {"name": path.stem, "path": str(path)}
    try:
        lora = load_lora(path)
    except LoraError as exc:
        info["error"] = str(exc)
        return info
    full = lora_hash(path)
    info.update(
        family=lora.family_guess(), kinds=lora.kinds, rank=lora.rank, modules=len(lora.modules),
        hash=full[:12], sha256=full,
    )
    return info
