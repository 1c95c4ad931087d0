"""A1111's model / VAE / LoRA / embedding hashes, computed on real files, and the hash cache."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from pathlib import Path
from typing import BinaryIO

import pytest

from sdcore import hashing
from sdcore.errors import CheckpointError, ModelNotFound
from sdcore.hashing import (
    addnet_hash_safetensors,
    cache_path,
    embedding_short_hash,
    legacy_model_hash,
    lora_hash,
    lora_short_hash,
    model_hash,
    sha256_file,
    vae_hash,
)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv("SDCORE_CACHE_DIR", str(directory))
    return directory


@pytest.fixture
def counter(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts how many times sdcore reads a file through to hash it (every file hash streams through
    `_digest_stream`); the test's own hashlib calls are not counted."""
    calls: list[int] = []
    real = hashing._digest_stream

    def counting(handle: BinaryIO) -> str:
        calls.append(1)
        return real(handle)

    monkeypatch.setattr(hashing, "_digest_stream", counting)
    return calls


def safetensors_bytes(header: dict[str, object], payload: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_sha256_and_model_hash_of_a_file(tmp_path: Path) -> None:
    data = b"checkpoint bytes " * 1000
    path = write(tmp_path / "model.safetensors", data)
    full = hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == full
    assert sha256_file(str(path), use_cache=False) == full
    assert model_hash(path) == full[:10]
    assert vae_hash(path) == full[:10]
    assert embedding_short_hash(path) == full[:12]
    assert len(model_hash(path)) == 10


def test_known_vector(tmp_path: Path) -> None:
    path = write(tmp_path / "abc.bin", b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert model_hash(path) == "ba7816bf8f"


def test_legacy_hash_reads_64k_at_1mib(tmp_path: Path) -> None:
    data = bytes(range(256)) * (0x130000 // 256)
    path = write(tmp_path / "old.ckpt", data)
    assert legacy_model_hash(path) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_legacy_hash_of_a_small_file_is_the_hash_of_nothing(tmp_path: Path) -> None:
    path = write(tmp_path / "tiny.ckpt", b"x" * 100)
    assert legacy_model_hash(path) == "e3b0c442"  # sha256(b"")[:8], exactly what A1111 gives


def test_addnet_hash_skips_the_header(tmp_path: Path) -> None:
    payload = b"\x01\x02\x03\x04" * 64
    a = write(
        tmp_path / "a.safetensors", safetensors_bytes({"__metadata__": {"ss_output_name": "a"}}, payload)
    )
    b = write(tmp_path / "b.safetensors", safetensors_bytes({"__metadata__": {"other": "metadata"}}, payload))
    expected = hashlib.sha256(payload).hexdigest()
    assert addnet_hash_safetensors(a) == expected
    assert addnet_hash_safetensors(b) == expected  # metadata edits do not change it
    assert sha256_file(a) != sha256_file(b)
    assert lora_hash(a) == expected
    assert lora_short_hash(a) == expected[:12]


def test_lora_hash_prefers_kohyas_precomputed_hash(tmp_path: Path) -> None:
    path = write(
        tmp_path / "k.safetensors",
        safetensors_bytes({"__metadata__": {"sshs_model_hash": "f" * 64}}, b"\0" * 16),
    )
    assert lora_short_hash(path) == "f" * 12


def test_lora_hash_of_a_pickle_is_the_full_file_sha256(tmp_path: Path) -> None:
    path = write(tmp_path / "old_lora.pt", b"pickle-ish bytes")
    assert lora_short_hash(path) == hashlib.sha256(b"pickle-ish bytes").hexdigest()[:12]


def test_addnet_hash_of_a_non_safetensors_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "fake.safetensors", struct.pack("<Q", 10**9) + b"short")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        addnet_hash_safetensors(path)


def test_diffusers_folder_hash_is_stable_and_content_based(tmp_path: Path) -> None:
    folder = tmp_path / "pipe"
    (folder / "unet").mkdir(parents=True)
    (folder / "vae").mkdir()
    write(folder / "unet" / "diffusion_pytorch_model.safetensors", b"unet weights")
    write(folder / "vae" / "diffusion_pytorch_model.safetensors", b"vae weights")
    write(folder / "model_index.json", b"{}")  # not a weight file: ignored
    lines = "".join(
        f"{rel}\0{hashlib.sha256(data).hexdigest()}\n"
        for rel, data in [
            ("unet/diffusion_pytorch_model.safetensors", b"unet weights"),
            ("vae/diffusion_pytorch_model.safetensors", b"vae weights"),
        ]
    )
    expected = hashlib.sha256(lines.encode()).hexdigest()[:10]
    assert model_hash(folder) == expected
    write(folder / "model_index.json", b'{"changed": true}')
    assert model_hash(folder) == expected
    write(folder / "vae" / "diffusion_pytorch_model.safetensors", b"other vae weights")
    assert model_hash(folder) != expected


def test_folder_without_weights_and_missing_paths(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no weight files"):
        model_hash(tmp_path / "empty")
    with pytest.raises(ModelNotFound, match="no such file"):
        sha256_file(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="not a regular file"):
        legacy_model_hash(tmp_path / "empty")


def test_second_call_is_a_cache_hit(tmp_path: Path, counter: list[int], cache_dir: Path) -> None:
    path = write(tmp_path / "big.safetensors", b"weights" * 5000)
    first = sha256_file(path)
    assert len(counter) == 1
    assert sha256_file(path) == first
    assert model_hash(path) == first[:10]
    assert len(counter) == 1  # no re-hash
    data = json.loads(cache_path().read_text())
    entry = data["sha256"][str(path.resolve())]
    assert entry == {"size": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns, "sha256": first}
    assert cache_path() == cache_dir / "hashes.json"


def test_use_cache_false_always_hashes(tmp_path: Path, counter: list[int]) -> None:
    path = write(tmp_path / "m.bin", b"abc")
    sha256_file(path, use_cache=False)
    sha256_file(path, use_cache=False)
    assert len(counter) == 2
    assert not cache_path().exists()


def test_cache_is_invalidated_when_the_file_changes(tmp_path: Path, counter: list[int]) -> None:
    path = write(tmp_path / "m.safetensors", b"version one")
    assert sha256_file(path) == hashlib.sha256(b"version one").hexdigest()
    # same size, newer mtime
    write(path, b"version two")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000))
    assert sha256_file(path) == hashlib.sha256(b"version two").hexdigest()
    # different size, mtime forced back to the cached one
    old_mtime = path.stat().st_mtime_ns
    write(path, b"version three!")
    os.utime(path, ns=(old_mtime, old_mtime))
    assert sha256_file(path) == hashlib.sha256(b"version three!").hexdigest()
    assert len(counter) == 3


def test_cache_persists_across_processes_and_survives_a_corrupt_file(
    tmp_path: Path, counter: list[int]
) -> None:
    path = write(tmp_path / "m.bin", b"data")
    sha256_file(path)
    assert len(counter) == 1
    cache_path().write_text("{not json")
    assert sha256_file(path) == hashlib.sha256(b"data").hexdigest()
    assert len(counter) == 2
    assert json.loads(cache_path().read_text())["version"] == 1  # rewritten cleanly


def test_unwritable_cache_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = write(tmp_path / "blocker", b"a file where the cache folder should be")
    monkeypatch.setenv("SDCORE_CACHE_DIR", str(blocker / "sub"))
    path = write(tmp_path / "m.bin", b"data")
    assert sha256_file(path) == hashlib.sha256(b"data").hexdigest()


def test_addnet_and_full_hashes_are_cached_separately(tmp_path: Path, counter: list[int]) -> None:
    path = write(tmp_path / "l.safetensors", safetensors_bytes({}, b"payload"))
    full, addnet = sha256_file(path), addnet_hash_safetensors(path)
    assert full != addnet
    assert (sha256_file(path), addnet_hash_safetensors(path)) == (full, addnet)
    assert len(counter) == 2


def test_threads_hash_one_file_once(tmp_path: Path, counter: list[int]) -> None:
    path = write(tmp_path / "shared.safetensors", os.urandom(1 << 20))
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(sha256_file(path))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1 and len(results) == 8
    assert results[0] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(counter) == 1
