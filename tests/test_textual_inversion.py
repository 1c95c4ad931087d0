"""Textual inversion plugin: A1111 .pt / .safetensors embeddings, name matching, weights, negative prompt,
token counts, width checks, TI hashes, `sdcore embeddings`. Embedding files are written here in A1111's formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from sdcore_plugins.textual_inversion.library import EmbeddingError, load_embedding, model_widths

GEN = dict(width=64, height=64, steps=2, seed=3, sampler="Euler")


@pytest.fixture(scope="module")
def engine(tiny_sd1_model: Path):
    from sdcore import Engine

    eng = Engine(device="cpu", default_model=tiny_sd1_model)
    if not eng.pm.has_plugin("prompt_language"):
        pytest.skip("the prompt-language plugin is not installed")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def model(engine):
    return engine.load_model()


def _vectors(n: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def _write_pt(path: Path, vec: torch.Tensor) -> Path:
    """A1111's `Embedding.save` layout."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": path.stem, "step": 100,
                "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "model"}, str(path))
    return path


def _write_st(path: Path, vec: torch.Tensor) -> Path:
    save_file({"emb_params": vec.contiguous()}, str(path))
    return path


def _png(result) -> bytes:
    return result.images[0].tobytes()


def test_pt_and_safetensors_give_identical_images(tmp_path, engine, model, monkeypatch):
    from sdcore.hashing import embedding_short_hash

    monkeypatch.setenv("SDCORE_EMBEDDING_DIRS", str(tmp_path))
    width = model_widths(model)["clip_l"]
    vec = _vectors(2, width, 1)
    pt = _write_pt(tmp_path / "tiemb.pt", vec)
    with_pt = engine.generate(dict(prompt="a tiemb cat", **GEN))
    assert f'TI hashes: "tiemb: {embedding_short_hash(pt)}"' in with_pt.infotexts[0]
    pt.unlink()
    st = _write_st(tmp_path / "tiemb.safetensors", vec)
    with_st = engine.generate(dict(prompt="a tiemb cat", **GEN))
    assert f'TI hashes: "tiemb: {embedding_short_hash(st)}"' in with_st.infotexts[0]
    assert _png(with_pt) == _png(with_st)
    st.unlink()
    gone = engine.generate(dict(prompt="a tiemb cat", **GEN))
    assert "TI hashes" not in gone.infotexts[0] and _png(gone) != _png(with_pt)


def test_mixed_case_three_vectors_weights_and_negative(tmp_path, engine, model, monkeypatch):
    from sdcore_plugins.prompt_language import count_tokens

    monkeypatch.setenv("SDCORE_EMBEDDING_DIRS", str(tmp_path))
    sub = tmp_path / "sub"
    sub.mkdir()
    path = _write_st(sub / "MixedCase.safetensors", _vectors(3, model_widths(model)["clip_l"], 2) * 3)
    plain = engine.generate(dict(prompt="a cat", **GEN))  # also refreshes the model's embeddings
    assert count_tokens("mixedcase", model) == [3]
    assert count_tokens("a mixedcase cat", model) == [count_tokens("a cat")[0] + 3]
    assert count_tokens("a MixedCase, mixedcase cat", model) == [count_tokens("a , cat")[0] + 6]
    used = engine.generate(dict(prompt="a mixedcase cat", **GEN))
    assert _png(used) != _png(plain)
    weighted = engine.generate(dict(prompt="a (MixedCase:1.2) cat", **GEN))
    assert _png(weighted) != _png(used)
    negative = engine.generate(dict(prompt="a cat", negative_prompt="MIXEDCASE", **GEN))
    assert _png(negative) != _png(plain)
    from sdcore.hashing import embedding_short_hash

    expect = f'TI hashes: "MixedCase: {embedding_short_hash(path)}"'
    for result in (used, weighted, negative):
        assert expect in result.infotexts[0]
    assert "TI hashes" not in plain.infotexts[0]


def test_wrong_width_fails_clearly(tmp_path, engine, model, monkeypatch):
    monkeypatch.setenv("SDCORE_EMBEDDING_DIRS", str(tmp_path))
    width = model_widths(model)["clip_l"]
    _write_st(tmp_path / "wide.safetensors", _vectors(1, width + 8, 3))
    engine.generate(dict(prompt="a cat", **GEN))  # not used: skipped, no error
    with pytest.raises(EmbeddingError, match=rf"wide.*wide\.safetensors.*width {width + 8}.*width {width}"):
        engine.submit(dict(prompt="a cat", negative_prompt="(wide:1.1)", **GEN))
    save_file({"clip_l": _vectors(1, 768, 4), "clip_g": _vectors(1, 1280, 4)}, str(tmp_path / "xlemb.safetensors"))
    with pytest.raises(EmbeddingError, match="xlemb"):
        engine.submit(dict(prompt="xlemb", **GEN))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.zeros(1, 4))})}, str(path))
    with pytest.raises(EmbeddingError, match="weights_only"):
        load_embedding(path)
    bad = tmp_path / "bad.safetensors"
    save_file({"a": torch.zeros(1, 4), "b": torch.zeros(1, 4)}, str(bad))
    with pytest.raises(EmbeddingError, match="neither"):
        load_embedding(bad)


def test_sdxl_embedding(tmp_path, tiny_sdxl_model, monkeypatch):
    from sdcore_plugins.prompt_language import count_tokens

    from sdcore import Engine
    from sdcore.hashing import embedding_short_hash

    monkeypatch.setenv("SDCORE_EMBEDDING_DIRS", str(tmp_path))
    eng = Engine(device="cpu", default_model=tiny_sdxl_model)
    try:
        model = eng.load_model()
        widths = model_widths(model)
        assert set(widths) == {"clip_l", "clip_g"}
        path = tmp_path / "XlThing.safetensors"
        save_file({"clip_l": _vectors(2, widths["clip_l"], 5) * 3, "clip_g": _vectors(2, widths["clip_g"], 6) * 3},
                  str(path))
        _write_pt(tmp_path / "sd1only.pt", _vectors(1, widths["clip_l"], 7))  # fits clip_l only: skipped
        plain = eng.generate(dict(prompt="a cat", **GEN))
        used = eng.generate(dict(prompt="a xlthing cat", **GEN))
        assert _png(used) != _png(plain)
        assert f'TI hashes: "XlThing: {embedding_short_hash(path)}"' in used.infotexts[0]
        assert count_tokens("xlthing", model) == [2]
        with pytest.raises(EmbeddingError, match="sd1only"):
            eng.submit(dict(prompt="a sd1only cat", **GEN))
    finally:
        eng.close()


def test_embeddings_cli_json(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from sdcore_plugins.textual_inversion.cli import embeddings_command

    from sdcore.hashing import embedding_short_hash

    monkeypatch.setenv("SDCORE_EMBEDDING_DIRS", str(tmp_path))
    _write_pt(tmp_path / "one.pt", _vectors(3, 768, 8))
    save_file({"clip_l": _vectors(1, 768, 9), "clip_g": _vectors(1, 1280, 9)}, str(tmp_path / "two.safetensors"))
    result = CliRunner().invoke(embeddings_command, ["--json"])
    assert result.exit_code == 0, result.output
    items = {item["name"]: item for item in json.loads(result.output)}
    assert items["one"]["vectors"] == 3 and items["one"]["family"] == "sd1" and items["one"]["width"] == 768
    assert items["one"]["hash"] == embedding_short_hash(tmp_path / "one.pt") and items["one"]["step"] == 100
    assert items["two"]["family"] == "sdxl" and items["two"]["width"] == {"clip_l": 768, "clip_g": 1280}
    text = CliRunner().invoke(embeddings_command, [])
    assert text.exit_code == 0 and "one\t3 vectors\tsd1\t768" in text.output
