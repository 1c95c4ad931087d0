"""The sdxl family plugin on tiny models: detection, loading, round trips, text encoding, micro-conditioning."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from sdcore.checkpoints import ModelSource, inspect_model  # noqa: E402
from sdcore.errors import CheckpointError, InvalidRequest, ModelNotFound, PromptError  # noqa: E402
from sdcore.models import LoadOptions, TokenOverride  # noqa: E402
from sdcore.testing import get_family, make_tiny_model, make_tiny_vae_file  # noqa: E402

VARIANTS = ["sdxl-base", "sdxl-refiner", "sdxl-inpaint"]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP spinning makes them 10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def modules_of(model):
    return ("unet", "vae", "text_encoder_2") + (() if model.text_encoder is None else ("text_encoder",))


@pytest.fixture(scope="module")
def family():
    return get_family("sdxl")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sdxl-models")


@pytest.fixture(scope="module")
def tiny(family):
    """Tiny models built once per module, by variant (seed 0)."""
    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = family.build_tiny(variant, seed=0)
        return cache[variant]

    return get


@pytest.fixture(scope="module")
def tiny_path(models_dir):
    """Tiny model files and folders written once per module: tiny_path(family, variant, fmt)."""
    cache = {}

    def get(family_name, variant, fmt="single_file"):
        key = (family_name, variant, fmt)
        if key not in cache:
            cache[key] = make_tiny_model(models_dir, family_name, variant, fmt=fmt)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def base(tiny):
    return tiny("sdxl-base")


@pytest.fixture(scope="module")
def refiner(tiny):
    return tiny("sdxl-refiner")


@pytest.fixture(scope="module")
def base_file(tiny_path):
    return tiny_path("sdxl", "sdxl-base")


def load(family, location, **options):
    source = inspect_model(location)
    variant = family.detect(source)
    assert variant is not None
    return family.load(source, variant, LoadOptions(**options))


def assert_same_weights(a, b, modules):
    for name in modules:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert list(sa) == list(sb), name
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), (name, key)


def test_plugin_module_imports_without_torch_or_diffusers():
    code = (
        "import sys, sdcore_plugins.sdxl, sdcore_plugins.sdxl.family;"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_tiny_models_have_real_layouts(family, base, refiner):
    assert family.name == "sdxl" and tuple(family.variants) == tuple(VARIANTS)
    te1, te2 = base.text_encoder.config, base.text_encoder_2.config
    assert te2.num_hidden_layers >= 10 and te1.hidden_size != te2.hidden_size and te1.vocab_size == 49408
    assert base.unet.config.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert base.unet.config.addition_embed_type == "text_time" and len(base.unet.config.down_block_types) == 3
    assert refiner.text_encoder is None and len(refiner.unet.config.down_block_types) == 4
    assert base.default_size == (1024, 1024) and base.latent_rgb_factors[0] == (0.3448, 0.4168, 0.4395)


@pytest.mark.parametrize("variant", VARIANTS)
def test_detects_every_variant_from_single_files_and_folders(family, tiny, tiny_path, variant):
    sd1 = get_family("sd1")
    path = tiny_path("sdxl", variant)
    source = inspect_model(path)
    assert family.detect(source) == variant and sd1.detect(source) is None
    folder = tiny_path("sdxl", variant, "diffusers")
    source = inspect_model(folder)
    assert family.detect(source) == variant and sd1.detect(source) is None
    model = family.load(source, variant, LoadOptions())
    assert model.variant == variant and model.is_refiner == (variant == "sdxl-refiner")
    assert_same_weights(tiny(variant), model, modules_of(model))


def test_refuses_files_of_other_kinds(family, models_dir, tiny_path):
    assert family.detect(inspect_model(tiny_path("sd1", "sd15"))) is None
    assert family.detect(inspect_model(tiny_path("sd1", "sd2-v"))) is None
    assert family.detect(inspect_model(tiny_path("sd1", "sd15", "diffusers"))) is None
    assert family.detect(inspect_model(make_tiny_vae_file(models_dir, "sdxl"))) is None
    conv = "model.diffusion_model.input_blocks.0.0.weight"
    keys = {conv: (320, 4, 3, 3), "conditioner.embedders.0.transformer.text_model.x": (1,),
            "conditioner.embedders.1.model.positional_embedding": (77, 1280), "edm_mean": (1, 4, 1, 1)}
    assert family.detect(ModelSource("playground.safetensors", "single_file", keys=keys)) is None
    del keys["edm_mean"]
    assert family.detect(ModelSource("real.safetensors", "single_file", keys=keys)) == "sdxl-base"
    with pytest.raises(ModelNotFound):
        family.detect(ModelSource("sdcore-tests/no-such-xl", "hub"))


@pytest.mark.parametrize("variant", ["sdxl-base", "sdxl-refiner"])
def test_single_file_round_trip_and_plain_diffusers(family, tiny, tiny_path, variant):
    import diffusers

    original = tiny(variant)
    path = tiny_path("sdxl", variant)
    loaded = load(family, path)
    assert_same_weights(original, loaded, modules_of(original))
    written, on_disk = loaded.to_single_file_state_dict(), load_file(str(path))
    assert set(written) == set(on_disk) and all(torch.equal(written[k], on_disk[k]) for k in on_disk)
    folder = tiny_path("sdxl", variant, "diffusers")
    cls = diffusers.StableDiffusionXLPipeline if variant == "sdxl-base" else diffusers.StableDiffusionXLImg2ImgPipeline
    pipe = cls.from_single_file(str(path), config=str(folder))
    assert_same_weights(original, pipe, modules_of(original))


def test_sgm_key_layout(base, refiner):
    keys = base.to_single_file_state_dict()
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
                             "conditioner.embedders.1.model.")) for k in keys)
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias" in keys  # diffusers' xl_base key
    assert keys["conditioner.embedders.1.model.text_projection"].shape == (64, 64)
    ref = refiner.to_single_file_state_dict()
    assert "conditioner.embedders.0.model.text_projection" in ref and not any("embedders.1" in k for k in ref)


def test_separate_vae_explicit_config_and_dtype(family, base, base_file, models_dir, tiny_path, tmp_path):
    import json
    import shutil

    vae = make_tiny_vae_file(models_dir / "xl-vae.safetensors", "sdxl", seed=1)
    model = load(family, base_file, vae=vae, dtype="bfloat16")
    other = family.build_tiny("sdxl-base", seed=1)
    assert all(torch.equal(a, b.to(torch.bfloat16)) for a, b in zip(model.vae.state_dict().values(),
                                                                     other.vae.state_dict().values(), strict=True))
    assert model.dtype == torch.bfloat16 and model.text_encoder_2.dtype == torch.bfloat16
    folder = tiny_path("sdxl", "sdxl-base", "diffusers")
    config = tmp_path / "config"
    shutil.copytree(folder, config, ignore=shutil.ignore_patterns("*.safetensors"))
    scheduler = config / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "prediction_type": "v_prediction"}))
    model = load(family, base_file, config=config, dtype="float16")
    assert model.prediction_type == "v_prediction" and model.unet.dtype == torch.float16
    assert torch.equal(model.unet.conv_in.weight, base.unet.conv_in.weight.half())


def test_v_pred_marker(family, base, tmp_path):
    path = tmp_path / "noob-vpred.safetensors"
    save_file({**base.to_single_file_state_dict(), "v_pred": torch.zeros(0)}, str(path))
    model = load(family, path)
    assert model.variant == "sdxl-base" and model.prediction_type == "v_prediction"


def test_truncated_file_is_checkpoint_error(family, base_file, tmp_path):
    data = base_file.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:-100])
    with pytest.raises(CheckpointError):
        inspect_model(path)
    path.write_bytes(data)
    source = inspect_model(path)
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError):
        family.load(source, "sdxl-base", LoadOptions())


# --- text encoding and micro-conditioning --------------------------------------------------------------------


def _rows(ids, pad):
    return torch.tensor([[49406, *ids, 49407] + [pad] * (75 - len(ids))])


def test_encoding_is_penultimate_layers_concatenated_and_pooled_from_clip_g(base):
    ids = base.tokenize("a photo of a cat")
    hidden, pooled = base.encode_token_chunks([ids, []])
    assert hidden.shape == (2, 77, 32 + 64) and pooled.shape == (2, 64)
    with torch.no_grad():
        l_out = base.text_encoder(input_ids=_rows(ids, 49407), output_hidden_states=True)
        g_out = base.text_encoder_2(input_ids=_rows(ids, 0), output_hidden_states=True)
    assert torch.equal(hidden[:1], torch.cat([l_out.hidden_states[-2], g_out.hidden_states[-2]], dim=-1))
    single, single_pooled = base.encode_token_chunks([ids])
    assert torch.equal(single_pooled, g_out.text_embeds)  # batch 1, the same computation as the reference
    assert torch.allclose(pooled[:1], single_pooled, atol=1e-5)  # batched rows agree up to float rounding
    text = base.encode_text("a photo of a cat, " * 30)
    assert text.embeds.shape == (1, 77 * 3, 96) and text.pooled.shape == (1, 64)


def test_encoding_matches_diffusers_encode_prompt(base):
    pipe = base.pipeline("txt2img")
    embeds, _, pooled, _ = pipe.encode_prompt("a photo of a cat", device=torch.device("cpu"),
                                               num_images_per_prompt=1, do_classifier_free_guidance=False)
    ours, our_pooled = base.encode_token_chunks([base.tokenize("a photo of a cat")])
    assert torch.equal(ours, embeds) and torch.equal(our_pooled, pooled)


def test_clip_skip_ignored_like_a1111_unless_enabled(base):
    ids = base.tokenize("a cat")
    one, _ = base.encode_token_chunks([ids], clip_skip=1)
    two, _ = base.encode_token_chunks([ids], clip_skip=2)
    assert torch.equal(one, two)
    base.apply_clip_skip = True
    try:
        assert torch.equal(base.encode_token_chunks([ids], clip_skip=1)[0], one)
        skipped, _ = base.encode_token_chunks([ids], clip_skip=2)
    finally:
        del base.apply_clip_skip  # back to the class default
    with torch.no_grad():
        l_out = base.text_encoder(input_ids=_rows(ids, 49407), output_hidden_states=True)
    assert torch.equal(skipped[..., :32], l_out.hidden_states[-3])


def test_token_override_needs_both_vectors(base):
    rng = torch.Generator().manual_seed(1)
    vectors = {"clip_l": torch.randn(32, generator=rng), "clip_g": torch.randn(64, generator=rng)}
    ours, ours_pooled = base.encode_token_chunks([[320, TokenOverride(vectors), 2368]])
    tables = [base.text_encoder.get_input_embeddings().weight.data, base.text_encoder_2.get_input_embeddings().weight.data]
    saved = [t[1000].clone() for t in tables]
    try:
        tables[0][1000], tables[1][1000] = vectors["clip_l"], vectors["clip_g"]
        theirs, theirs_pooled = base.encode_token_chunks([[320, 1000, 2368]])
    finally:
        for table, row in zip(tables, saved, strict=True):
            table[1000] = row
    assert torch.equal(ours, theirs) and torch.equal(ours_pooled, theirs_pooled)
    with pytest.raises(PromptError, match="clip_g"):
        base.encode_token_chunks([[TokenOverride({"clip_l": vectors["clip_l"]})]])


def test_added_cond_kwargs_time_ids(base, refiner):
    _, pooled = base.encode_token_chunks([base.tokenize("a cat")])
    cond = base.added_cond_kwargs(pooled, width=96, height=64, batch=3)
    assert cond["text_embeds"].shape == (3, 64) and torch.equal(cond["text_embeds"][2], pooled[0])
    assert cond["time_ids"].tolist() == [[64.0, 96.0, 0.0, 0.0, 64.0, 96.0]] * 3
    pipe = base.pipeline("txt2img")
    theirs = pipe._get_add_time_ids((64, 96), (0, 0), (64, 96), dtype=torch.float32, text_encoder_projection_dim=64)
    assert torch.equal(cond["time_ids"][:1], theirs)
    _, rpooled = refiner.encode_token_chunks([refiner.tokenize("a cat")])
    assert refiner.added_cond_kwargs(rpooled, 96, 64, 1)["time_ids"].tolist() == [[64.0, 96.0, 0.0, 0.0, 6.0]]
    assert refiner.added_cond_kwargs(rpooled, 96, 64, 1, negative=True)["time_ids"].tolist() == [[64.0, 96.0, 0.0, 0.0, 2.5]]
    with pytest.raises(InvalidRequest):
        base.added_cond_kwargs(None, 64, 64, 1)


def test_pipelines_run_two_steps(base, refiner):
    pipe = base.pipeline("txt2img")
    assert pipe.unet is base.unet and pipe.text_encoder_2 is base.text_encoder_2
    image = pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)
    i2i = refiner.pipeline("img2img")
    assert i2i.config.requires_aesthetics_score is True
    out = i2i("a cat", image=torch.rand(1, 3, 64, 64), num_inference_steps=2, strength=1.0, output_type="np",
              generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3)
    assert type(base.pipeline("inpaint")).__name__ == "StableDiffusionXLInpaintPipeline"
    with pytest.raises(InvalidRequest, match="refiner"):
        refiner.pipeline("txt2img")


def test_shipped_configs_are_the_real_architectures(family):
    from sdcore_plugins import sdcommon

    folder = family.config_folder("sdxl-base")
    unet = sdcommon.build_empty(sdcommon.unet_factory(sdcommon.read_component_config(folder, "unet")))
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 2) == 2567.46
    assert Path(family.config_folder("sdxl-refiner"), "text_encoder").exists() is False
