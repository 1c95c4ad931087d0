"""LoRA plugin: formats, exact scaling, bit-exact restore, family checks, merge CLI, infotext hashes.

LoRA files are written here in the real key layouts (kohya LDM/diffusers names, PEFT, LyCORIS) for the tiny models.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from sdcore_plugins.lora import LoraOptions, parse_tag
from sdcore_plugins.lora import patch as lora_patch
from sdcore_plugins.lora.formats import LoraError
from sdcore_plugins.lora.library import load_lora

GEN = dict(width=64, height=64, steps=2, seed=3, sampler="Euler")


@pytest.fixture(scope="module")
def engine(tiny_sd1_model: Path):
    from sdcore import Engine

    eng = Engine(device="cpu", default_model=tiny_sd1_model)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def model(engine):
    return engine.load_model()


def _snapshot(model) -> dict[str, torch.Tensor]:
    out = {}
    for comp, module in model.modules().items():
        for k, v in module.state_dict().items():
            out[f"{comp}.{k}"] = v.detach().clone()
    return out


def _assert_same(model, snap) -> None:
    now = _snapshot(model)
    assert now.keys() == snap.keys()
    changed = [k for k in now if not torch.equal(now[k], snap[k])]
    assert not changed, changed[:5]


def _lora_pair(weight: torch.Tensor, rank: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    out_f, in_f = weight.shape[0], weight.shape[1]
    if weight.dim() == 4:  # LoCon: down is a kxk conv, up a 1x1 conv
        down = torch.randn(rank, in_f, *weight.shape[2:], generator=gen) * 0.1
        up = torch.randn(out_f, rank, 1, 1, generator=gen) * 0.1
    else:
        down = torch.randn(rank, in_f, generator=gen) * 0.1
        up = torch.randn(out_f, rank, generator=gen) * 0.1
    return down, up


# kohya name -> (component, module path): LDM-named UNet layers (conv + linear), diffusers-named ones, and a
# partial text encoder (only q_proj and fc1, which diffusers drops).
SD1_KOHYA = {
    "lora_unet_input_blocks_0_0": ("unet", "conv_in"),
    "lora_unet_input_blocks_1_1_proj_in": ("unet", "down_blocks.0.attentions.0.proj_in"),
    "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k": (
        "unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"),
    "lora_unet_middle_block_0_in_layers_2": ("unet", "mid_block.resnets.0.conv1"),
    "lora_unet_time_embed_0": ("unet", "time_embedding.linear_1"),
    "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj": (
        "unet", "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"),
    "lora_unet_down_blocks_0_resnets_0_conv2": ("unet", "down_blocks.0.resnets.0.conv2"),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ("text_encoder", "encoder.layers.0.self_attn.q_proj"),
    "lora_te_text_model_encoder_layers_1_mlp_fc1": ("text_encoder", "encoder.layers.1.mlp.fc1"),
}


def _write_kohya(path: Path, model, names: dict[str, tuple[str, str]], seed: int = 0) -> dict[str, tuple]:
    """A kohya file with a different rank and alpha per module; returns name -> (comp, module, down, up, scale)."""
    gen = torch.Generator().manual_seed(seed)
    state, expect = {}, {}
    for i, (key, (comp, mod)) in enumerate(names.items()):
        weight = model.modules()[comp].get_submodule(mod).weight
        rank = 1 + (i % 3)
        alpha = [0.5, 1.0, 3.0, 8.0][i % 4]
        down, up = _lora_pair(weight, rank, gen)
        state[f"{key}.lora_down.weight"] = down
        state[f"{key}.lora_up.weight"] = up
        state[f"{key}.alpha"] = torch.tensor(alpha)
        expect[key] = (comp, mod, down, up, alpha / rank)
    save_file(state, str(path), metadata={"ss_network_module": "networks.lora"})
    return expect


def _apply(model, path: Path, te: float, unet: float) -> None:
    lora_patch.apply(model, [lora_patch.resolve(model, load_lora(path), te, unet)])


def test_kohya_per_module_alpha_exact_and_restored(tmp_path, model):
    path = tmp_path / "kohya.safetensors"
    expect = _write_kohya(path, model, SD1_KOHYA)
    base = _snapshot(model)
    _apply(model, path, te=0.5, unet=0.7)
    try:
        for comp, mod, down, up, scale in expect.values():
            weight = model.modules()[comp].get_submodule(mod).weight
            w = 0.5 if comp == "text_encoder" else 0.7
            delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
            want = base[f"{comp}.{mod}.weight"] + w * scale * delta
            torch.testing.assert_close(weight.detach(), want, rtol=0, atol=1e-6)
        touched = {f"{c}.{m}.weight" for c, m, *_ in expect.values()}
        now = _snapshot(model)
        assert [k for k in now if k not in touched and not torch.equal(now[k], base[k])] == []
    finally:
        lora_patch.restore(model)
    _assert_same(model, base)


def test_peft_keys_and_te_only_v_proj(tmp_path, model):
    gen = torch.Generator().manual_seed(1)
    names = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": ("unet",),
        "text_encoder.text_model.encoder.layers.0.self_attn.v_proj": ("text_encoder",),
    }
    state, base = {}, _snapshot(model)
    for key, (comp,) in names.items():
        mod = key.split(".", 1)[1].replace("text_model.", "")
        weight = model.modules()[comp].get_submodule(mod).weight
        down, up = _lora_pair(weight, 2, gen)
        state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"] = down, up
    path = tmp_path / "peft.safetensors"
    save_file(state, str(path))
    _apply(model, path, 1.0, 1.0)
    try:
        for key, (comp,) in names.items():
            mod = key.split(".", 1)[1].replace("text_model.", "")
            want = base[f"{comp}.{mod}.weight"] + state[f"{key}.lora_B.weight"] @ state[f"{key}.lora_A.weight"]
            torch.testing.assert_close(model.modules()[comp].get_submodule(mod).weight.detach(), want,
                                       rtol=0, atol=1e-6)
    finally:
        lora_patch.restore(model)
    _assert_same(model, base)


def test_loha_lokr_formulas(tmp_path, model):
    gen = torch.Generator().manual_seed(2)
    lin = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"  # [32, 32]
    conv = "down_blocks.0.resnets.0.conv1"  # [32, 32, 3, 3]
    wl = model.unet.get_submodule(lin).weight
    wc = model.unet.get_submodule(conv).weight
    r = 4
    h = {n: torch.randn(*s, generator=gen) * 0.1 for n, s in {
        "w1a": (wl.shape[0], r), "w1b": (r, wl.shape[1]), "w2a": (wl.shape[0], r), "w2b": (r, wl.shape[1])}.items()}
    hc = {n: torch.randn(*s, generator=gen) * 0.1 for n, s in {
        "w1a": (wc.shape[0], r), "w1b": (r, wc[0].numel()), "w2a": (wc.shape[0], r), "w2b": (r, wc[0].numel())}.items()}
    # LoKr: linear with w1 full + w2 decomposed (alpha/rank applies); conv with both full (scale 1)
    k1 = torch.randn(4, 4, generator=gen) * 0.1
    k2a, k2b = torch.randn(4, 2, generator=gen) * 0.1, torch.randn(2, 4, generator=gen) * 0.1
    c1, c2 = torch.randn(2, 4, generator=gen) * 0.1, torch.randn(8, 8, 3, 3, generator=gen) * 0.1
    loha = {"lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_v": (h, 2.0),
            "lora_unet_input_blocks_1_0_in_layers_2": (hc, 6.0)}
    state = {}
    for key, (t, alpha) in loha.items():
        for n, v in t.items():
            state[f"{key}.hada_{n[:2]}_{n[2]}"] = v
        state[f"{key}.alpha"] = torch.tensor(alpha)
    lokr_lin, lokr_conv = "lora_unet_output_blocks_3_1_proj_out", "lora_unet_output_blocks_0_0_in_layers_2"
    state.update({f"{lokr_lin}.lokr_w1": k1, f"{lokr_lin}.lokr_w2_a": k2a, f"{lokr_lin}.lokr_w2_b": k2b,
                  f"{lokr_lin}.alpha": torch.tensor(1.0),
                  f"{lokr_conv}.lokr_w1": c1, f"{lokr_conv}.lokr_w2": c2, f"{lokr_conv}.alpha": torch.tensor(5.0)})
    path = tmp_path / "lyco.safetensors"
    save_file(state, str(path))
    base = _snapshot(model)
    _apply(model, path, 0.6, 0.6)
    try:
        for module, t, alpha in ((lin, h, 2.0), (conv, hc, 6.0)):
            weight = model.unet.get_submodule(module).weight
            want_delta = ((t["w1a"] @ t["w1b"]) * (t["w2a"] @ t["w2b"]) * alpha / r).reshape(weight.shape)
            torch.testing.assert_close(weight.detach(), base[f"unet.{module}.weight"] + 0.6 * want_delta,
                                       rtol=0, atol=1e-6)
        proj_out = "up_blocks.1.attentions.0.proj_out"  # LDM output_blocks.3.1: a 16x16 1x1 conv
        lokr = [(proj_out, torch.kron(k1, k2a @ k2b) * (1.0 / 2)),
                ("up_blocks.0.resnets.0.conv1", torch.kron(c1.reshape(2, 4, 1, 1), c2))]
        for module, want_delta in lokr:
            weight = model.unet.get_submodule(module).weight
            torch.testing.assert_close(weight.detach(), base[f"unet.{module}.weight"] + 0.6 * want_delta.reshape(
                weight.shape), rtol=0, atol=1e-6)
    finally:
        lora_patch.restore(model)
    _assert_same(model, base)


def test_sdxl_kohya_te1_te2_and_ldm_unet():
    from sdcore.testing.models import build_tiny_model

    xl = build_tiny_model("sdxl")
    names = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ("text_encoder", "encoder.layers.0.self_attn.q_proj"),
        "lora_te2_text_model_encoder_layers_1_mlp_fc2": ("text_encoder_2", "text_model.encoder.layers.1.mlp.fc2"),
        "lora_unet_input_blocks_4_1_proj_in": ("unet", "down_blocks.1.attentions.0.proj_in"),
        "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_out_0": (
            "unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"),
        "lora_unet_label_emb_0_0": ("unet", "add_embedding.linear_1"),
    }
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "xl.safetensors"
        expect = _write_kohya(path, xl, names, seed=4)
        base = _snapshot(xl)
        _apply(xl, path, 1.0, 0.9)
        try:
            for comp, mod, down, up, scale in expect.values():
                weight = xl.modules()[comp].get_submodule(mod).weight
                w = 0.9 if comp == "unet" else 1.0
                want = base[f"{comp}.{mod}.weight"] + w * scale * (up @ down.flatten(1)).reshape(weight.shape)
                torch.testing.assert_close(weight.detach(), want, rtol=0, atol=1e-6)
        finally:
            lora_patch.restore(xl)
        _assert_same(xl, base)


def test_wrong_family_fails_before_touching(tmp_path, model):
    state = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(2, 32),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(32, 2),
        "lora_unet_input_blocks_0_0.lora_down.weight": torch.ones(2, 4, 3, 3),
        "lora_unet_input_blocks_0_0.lora_up.weight": torch.ones(32, 2, 1, 1),
    }
    path = tmp_path / "xl_only.safetensors"
    save_file(state, str(path))
    base = _snapshot(model)
    with pytest.raises(LoraError) as err:
        _apply(model, path, 1.0, 1.0)
    text = str(err.value)
    assert "xl_only.safetensors" in text and "SDXL" in text and "sd1" in text and model.variant in text
    _assert_same(model, base)
    junk = tmp_path / "junk.safetensors"
    save_file({"lora_unet_nothing_here.lora_down.weight": torch.ones(1, 2),
               "lora_unet_nothing_here.lora_up.weight": torch.ones(2, 1)}, str(junk))
    with pytest.raises(LoraError, match="match no layer"):
        _apply(model, junk, 1.0, 1.0)
    _assert_same(model, base)


def test_tag_parsing():
    assert parse_tag(["a", "0.8"]).multipliers() == (0.8, 0.8)
    assert parse_tag(["a", "0.5", "1.2"]).multipliers() == (0.5, 1.2)
    assert parse_tag(["a", "te=0.3", "unet=0"]).multipliers() == (0.3, 0.0)
    assert parse_tag(["a"]).multipliers() == (1.0, 1.0)
    with pytest.raises(LoraError):
        parse_tag(["a", "x"])
    opts = LoraOptions.model_validate({"loras": [{"name": "a", "weight": 0.8}, {"name": "b", "te": 0.5, "unet": 1}]})
    info = opts.infotext()
    assert LoraOptions.from_infotext(info) == {"loras": [{"name": "a", "weight": 0.8},
                                                         {"name": "b", "te": 0.5, "unet": 1.0}]}


def test_engine_switching_restores_and_hashes(tmp_path, engine, model, monkeypatch):
    from sdcore.hashing import lora_short_hash

    monkeypatch.setenv("SDCORE_LORA_DIRS", str(tmp_path))
    _write_kohya(tmp_path / "style_a.safetensors", model, SD1_KOHYA, seed=5)
    _write_kohya(tmp_path / "style_b.safetensors", model, dict(list(SD1_KOHYA.items())[:4]), seed=6)
    base = _snapshot(model)
    plain = engine.generate(dict(prompt="a cat", **GEN))
    with_a = engine.generate(dict(prompt="a cat", options={"lora": {"loras": [{"name": "style_a", "weight": 2}]}},
                                  **GEN))
    _assert_same(model, base)
    both = engine.generate(dict(prompt="a cat", options={"lora": {"loras": [
        {"name": "style_b", "weight": 0.5}, {"name": str(tmp_path / "style_a.safetensors"), "te": 0, "unet": 1}]}},
        **GEN))
    _assert_same(model, base)
    again = engine.generate(dict(prompt="a cat", **GEN))
    assert plain.images[0].tobytes() == again.images[0].tobytes()
    assert with_a.images[0].tobytes() != plain.images[0].tobytes()
    assert f'Lora hashes: "style_a: {lora_short_hash(tmp_path / "style_a.safetensors")}"' in with_a.infotexts[0]
    assert f"style_b: {lora_short_hash(tmp_path / 'style_b.safetensors')}" in both.infotexts[0]
    assert "Lora hashes" not in plain.infotexts[0]
    from sdcore.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="not found"):
        engine.submit(dict(prompt="x", options={"lora": {"loras": [{"name": "missing"}]}}, **GEN))


def test_merge_cli_ldm_layout(tmp_path, tiny_sd1_model, model):
    from click.testing import CliRunner
    from sdcore_plugins.lora.cli import merge_command

    lora = tmp_path / "m.safetensors"
    expect = _write_kohya(lora, model, dict(list(SD1_KOHYA.items())[:2]), seed=7)
    out = tmp_path / "merged.safetensors"
    result = CliRunner().invoke(merge_command, ["--model", str(tiny_sd1_model), "--lora", f"{lora}:0.8",
                                                "--out", str(out)])
    assert result.exit_code == 0, result.output
    merged, original = load_file(str(out)), load_file(str(tiny_sd1_model))
    assert merged.keys() == original.keys()
    ldm_keys = {"conv_in": "model.diffusion_model.input_blocks.0.0.weight",
                "down_blocks.0.attentions.0.proj_in": "model.diffusion_model.input_blocks.1.1.proj_in.weight"}
    for _comp, mod, down, up, scale in expect.values():
        key = ldm_keys[mod]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(original[key].shape)
        torch.testing.assert_close(merged[key], original[key] + 0.8 * scale * delta, rtol=0, atol=1e-6)
    same = [k for k in original if k not in ldm_keys.values() and not torch.equal(merged[k], original[k])]
    assert same == []


def test_loras_cli_json(tmp_path, model, monkeypatch):
    from click.testing import CliRunner
    from sdcore_plugins.lora.cli import loras_command

    monkeypatch.setenv("SDCORE_LORA_DIRS", str(tmp_path))
    _write_kohya(tmp_path / "one.safetensors", model, SD1_KOHYA)
    result = CliRunner().invoke(loras_command, ["--json"])
    assert result.exit_code == 0, result.output
    (item,) = json.loads(result.output)
    assert item["name"] == "one" and item["kinds"] == ["lora"] and len(item["hash"]) == 12
    assert item["modules"] == len(SD1_KOHYA)


def test_prompt_tags_and_text_encoder_cache(tmp_path, engine, model, monkeypatch):
    if not engine.pm.has_plugin("prompt_language"):
        pytest.skip("the prompt-language plugin is not installed")
    monkeypatch.setenv("SDCORE_LORA_DIRS", str(tmp_path))
    te_only = {k: v for k, v in SD1_KOHYA.items() if v[0] == "text_encoder"}
    _write_kohya(tmp_path / "te_only.safetensors", model, te_only, seed=8)
    base = _snapshot(model)
    plain = engine.generate(dict(prompt="a cat", **GEN))
    tagged = engine.generate(dict(prompt="a cat <lora:te_only:4>", **GEN))
    by_option = engine.generate(dict(prompt="a cat", options={"lora": {"loras": [{"name": "te_only", "weight": 4}]}},
                                     **GEN))
    after = engine.generate(dict(prompt="a cat", **GEN))
    _assert_same(model, base)
    assert tagged.images[0].tobytes() != plain.images[0].tobytes()  # the cached encoding was not reused
    assert tagged.images[0].tobytes() == by_option.images[0].tobytes()
    assert after.images[0].tobytes() == plain.images[0].tobytes()
    assert "Lora hashes" in tagged.infotexts[0] and "te_only: " in tagged.infotexts[0]
    from sdcore.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="not found"):
        engine.submit(dict(prompt="a cat <lora:nope:1>", **GEN))
