"""The sd1 family plugin (SD 1.x / 2.x) on tiny models: detection, loading, round trips, text encoding."""

import os
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from sdcore.checkpoints import ModelSource, inspect_model  # noqa: E402
from sdcore.errors import CheckpointError, InvalidRequest, ModelNotFound, PromptError  # noqa: E402
from sdcore.models import DiffusionModel, LoadOptions, TokenOverride  # noqa: E402
from sdcore.testing import get_family, make_tiny_model, make_tiny_vae_file  # noqa: E402

VARIANTS = ["sd15", "sd15-inpaint", "sd2", "sd2-v", "sd2-inpaint"]
MODULES = ("unet", "vae", "text_encoder")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP spinning makes them 10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def family():
    return get_family("sd1")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sd1-models")


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
def sd15(tiny):
    return tiny("sd15")


@pytest.fixture(scope="module")
def sd15_file(tiny_path):
    return tiny_path("sd1", "sd15")


@pytest.fixture(scope="module")
def sd15_folder(tiny_path):
    return tiny_path("sd1", "sd15", "diffusers")


def load(family, location, **options):
    source = inspect_model(location)
    variant = family.detect(source)
    assert variant is not None
    return family.load(source, variant, LoadOptions(**options))


def assert_same_weights(a, b, modules=MODULES):
    for name in modules:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert list(sa) == list(sb), name
        for key in sa:
            assert sa[key].dtype == sb[key].dtype, (name, key)
            assert torch.equal(sa[key], sb[key]), (name, key)


# --- plugin and detection ----------------------------------------------------------------------------------


def test_plugin_module_imports_without_torch_or_diffusers():
    code = (
        "import sys, sdcore_plugins.sd1, sdcore_plugins.sd1.family, sdcore_plugins.sdcommon;"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_family_arrives_through_the_plugin_system(family):
    assert family.name == "sd1" and tuple(family.variants) == tuple(VARIANTS)
    for variant in VARIANTS:
        assert (family.config_folder(variant) / "model_index.json").is_file()


@pytest.mark.parametrize("variant", VARIANTS)
def test_detects_every_variant_from_single_files_and_folders(family, tiny_path, variant):
    sdxl = get_family("sdxl")
    path = tiny_path("sd1", variant)
    source = inspect_model(path)
    assert family.detect(source) == variant
    assert sdxl.detect(source) is None
    folder = tiny_path("sd1", variant, "diffusers")
    source = inspect_model(folder)
    assert family.detect(source) == variant
    assert sdxl.detect(source) is None
    model = family.load(source, variant, LoadOptions())
    assert model.variant == variant and model.is_inpainting == variant.endswith("inpaint")
    assert model.prediction_type == ("v_prediction" if variant == "sd2-v" else "epsilon")
    assert model.default_size == ((768, 768) if variant == "sd2-v" else (512, 512))


def test_sd2_prediction_from_marker_metadata_and_name(family, tiny_path, tmp_path):
    state = load_file(str(tiny_path("sd1", "sd2")))

    def detect(name, metadata=None, extra=None):
        path = tmp_path / f"{name}.safetensors"
        save_file({**state, **(extra or {})}, str(path), metadata=metadata)
        return family.detect(inspect_model(path))

    assert detect("anything") == "sd2-v"  # keys cannot tell 512 from 768: default v like diffusers
    assert detect("sd21-finetune-10000steps") == "sd2-v"
    assert detect("v2-1_512-ema-pruned") == "sd2"
    assert detect("v2-1_768-ema-pruned") == "sd2-v"
    assert detect("model", {"modelspec.prediction_type": "epsilon"}) == "sd2"
    assert detect("model", {"modelspec.architecture": "stable-diffusion-v2-768-v"}) == "sd2-v"
    assert detect("v2-1_512-ema-pruned", extra={"v_pred": torch.zeros(0)}) == "sd2-v"


def test_v_pred_marker_makes_sd15_v_prediction(family, sd15, tmp_path):
    path = tmp_path / "vpred-sd15.safetensors"
    save_file({**sd15.to_single_file_state_dict(), "v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)}, str(path))
    model = load(family, path)
    assert model.variant == "sd15" and model.prediction_type == "v_prediction"
    assert model.scheduler_config["rescale_betas_zero_snr"] is True
    written = model.to_single_file_state_dict()
    assert "v_pred" in written and "ztsnr" in written  # written back, so the file round-trips


def _keys(**shapes):
    return {k: tuple(v) for k, v in shapes.items()}


def test_refuses_files_of_other_kinds(family, models_dir, tiny_path):
    xl = inspect_model(tiny_path("sdxl", "sdxl-base"))
    assert family.detect(xl) is None
    vae = inspect_model(make_tiny_vae_file(models_dir, "sd1"))
    assert family.detect(vae) is None
    conv = "model.diffusion_model.input_blocks.0.0.weight"
    text = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    pix2pix = ModelSource("ip2p.safetensors", "single_file", keys={conv: (320, 8, 3, 3), text: (49408, 768)})
    assert family.detect(pix2pix) is None
    unet_only = ModelSource("unet.safetensors", "single_file", keys={conv: (320, 4, 3, 3)})
    assert family.detect(unet_only) is None
    sdxl_unet = ModelSource("x.safetensors", "single_file", keys={
        conv: (320, 4, 3, 3), text: (49408, 768), "model.diffusion_model.label_emb.0.0.weight": (1280, 2816)})
    assert family.detect(sdxl_unet) is None
    sd1 = ModelSource("real.safetensors", "single_file", keys={conv: (320, 4, 3, 3), text: (49408, 768)})
    assert family.detect(sd1) == "sd15"


def test_hub_id_offline_is_model_not_found(family):
    with pytest.raises(ModelNotFound, match="hub"):
        family.detect(ModelSource("sdcore-tests/no-such-model", "hub"))


# --- loading -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["sd15", "sd2-v"])
def test_single_file_round_trip_is_bit_identical(family, tiny, tiny_path, variant):
    original = tiny(variant)
    path = tiny_path("sd1", variant)
    loaded = load(family, path)
    assert_same_weights(original, loaded)
    assert isinstance(loaded, DiffusionModel) and loaded.name == path.stem
    written, on_disk = loaded.to_single_file_state_dict(), load_file(str(path))
    assert set(written) == set(on_disk)
    assert all(torch.equal(written[k], on_disk[k]) for k in on_disk)


def test_reads_clip_keys_without_the_text_model_level(family, sd15, tmp_path):
    old = "cond_stage_model.transformer.text_model."
    state = {k.replace(old, "cond_stage_model.transformer."): v for k, v in sd15.to_single_file_state_dict().items()}
    path = tmp_path / "old-merge.safetensors"
    save_file(state, str(path))
    assert_same_weights(sd15, load(family, path))


def test_single_file_key_layouts(tiny):
    sd1 = tiny("sd15").to_single_file_state_dict()
    sd2 = tiny("sd2").to_single_file_state_dict()
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(k.startswith(prefixes) for k in sd1)
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in sd1
    assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in sd1  # diffusers' "v1" marker
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in sd1  # upsampler after a plain block
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in sd1  # upsampler after an attention block
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in sd1 and sd1["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.model.")) for k in sd2)
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in sd2
    assert "cond_stage_model.model.positional_embedding" in sd2


@pytest.mark.parametrize("variant", ["sd15", "sd2"])
def test_plain_diffusers_from_single_file_gives_the_same_weights(tiny, tiny_path, variant):
    from diffusers import StableDiffusionPipeline

    original = tiny(variant)
    path = tiny_path("sd1", variant)
    folder = tiny_path("sd1", variant, "diffusers")
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(folder), safety_checker=None)
    assert_same_weights(original, pipe)


def test_diffusers_folder_loads_identically(family, sd15, sd15_folder):
    model = load(family, sd15_folder)
    assert_same_weights(sd15, model)
    assert model.tokenizer("a cat")["input_ids"] == [49406, 320, 2368, 49407]


def test_pickle_only_folder_needs_the_opt_in(family, sd15, tmp_path):
    from sdcore.errors import UnsafeCheckpoint

    folder = tmp_path / "pickled"
    sd15.pipeline("txt2img").save_pretrained(str(folder), safe_serialization=False)
    assert not list(folder.glob("unet/*.safetensors")) and list(folder.glob("unet/*.bin"))
    with pytest.raises(UnsafeCheckpoint, match="allow"):
        load(family, folder)
    model = load(family, folder, allow_pickle=True)  # diffusers/transformers from_pretrained, weights_only
    assert_same_weights(sd15, model)


def test_pickle_single_file_with_opt_in(family, sd15, tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": sd15.to_single_file_state_dict(), "global_step": 1}, path)
    source = inspect_model(path, allow_pickle=True)
    model = family.load(source, family.detect(source), LoadOptions(allow_pickle=True))
    assert_same_weights(sd15, model)


def test_shipped_config_folder_is_complete_for_plain_diffusers(family, tmp_path):
    from transformers import CLIPTokenizer

    folder = family.diffusers_config_folder("sd2-v", tmp_path / "cfg")
    for rel in ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                "scheduler/scheduler_config.json"):
        assert (folder / rel).is_file()
    tok = CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer", local_files_only=True)
    assert tok.pad_token == "!"


@pytest.mark.parametrize("layout", ["ldm", "diffusers", "folder"])
def test_separate_vae_replaces_the_vae(family, sd15, sd15_file, models_dir, layout):
    if layout == "folder":
        vae_path = make_tiny_model(models_dir, "sd1", "sd15", fmt="diffusers", seed=1)
    else:
        vae_path = make_tiny_vae_file(models_dir / f"vae-{layout}.safetensors", "sd1", seed=1, layout=layout)
    model = load(family, sd15_file, vae=vae_path)
    other = family.build_tiny("sd15", seed=1)
    assert_same_weights(other, model, ("vae",))
    assert_same_weights(sd15, model, ("unet", "text_encoder"))
    assert not torch.equal(sd15.vae.decoder.conv_out.weight, model.vae.decoder.conv_out.weight)


def test_file_without_vae_needs_a_vae(family, sd15, tmp_path, models_dir):
    path = tmp_path / "novae.safetensors"
    save_file({k: v for k, v in sd15.to_single_file_state_dict().items() if not k.startswith("first_stage_model.")},
              str(path))
    with pytest.raises(CheckpointError, match="VAE"):
        load(family, path)
    model = load(family, path, vae=make_tiny_vae_file(models_dir, "sd1", seed=0))
    assert_same_weights(sd15, model)


def test_explicit_config_folder_is_used(family, sd15_file, sd15_folder, tmp_path):
    import json
    import shutil

    config = tmp_path / "config"
    shutil.copytree(sd15_folder, config, ignore=shutil.ignore_patterns("*.safetensors"))
    scheduler = config / "scheduler" / "scheduler_config.json"
    data = json.loads(scheduler.read_text())
    data.update(prediction_type="v_prediction", beta_end=0.02)
    scheduler.write_text(json.dumps(data))
    tokenizer_config = config / "tokenizer" / "tokenizer_config.json"
    tokenizer_config.write_text(json.dumps({**json.loads(tokenizer_config.read_text()), "pad_token": "!"}))
    model = load(family, sd15_file, config=config)
    assert model.scheduler_config["beta_end"] == 0.02 and model.prediction_type == "v_prediction"
    assert model.tokenizer.pad_token_id == 0  # the config folder's tokenizer, not the shipped SD 1.x one
    # a config that does not fit the file is a clear error
    unet = config / "unet" / "config.json"
    data = json.loads(unet.read_text())
    data["block_out_channels"] = [16, 16, 16, 16]
    unet.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="config"):
        load(family, sd15_file, config=config)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_load_dtype(family, sd15, sd15_file, dtype):
    model = load(family, sd15_file, dtype=dtype)
    expected = getattr(torch, dtype)
    for name in MODULES:
        module = getattr(model, name)
        assert all(p.dtype == expected for p in module.parameters()), name
        ours, ref = module.state_dict(), getattr(sd15, name).state_dict()
        assert all(torch.equal(ours[k], ref[k].to(expected)) for k in ref if ref[k].is_floating_point())
    assert model.dtype == expected
    with pytest.raises(InvalidRequest):
        load(family, sd15_file, dtype="float8")


def test_corrupt_or_truncated_files_are_checkpoint_errors(family, sd15_file, tmp_path):
    data = sd15_file.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        inspect_model(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 64)
    with pytest.raises(CheckpointError):
        inspect_model(garbage)
    # truncated after inspection (a download still in progress): the loader reports it too
    late = tmp_path / "late.safetensors"
    late.write_bytes(data)
    source = inspect_model(late)
    late.write_bytes(data[: len(data) - 4096])
    with pytest.raises(CheckpointError):
        family.load(source, "sd15", LoadOptions())


# --- text encoding -------------------------------------------------------------------------------------------


def test_chunks_are_bos_tokens_eos_padded(sd15):
    ids = sd15.tokenize("a photo of a cat")
    assert ids == [320, 1125, 539, 320, 2368]
    hidden, pooled = sd15.encode_token_chunks([ids, ids[:2], []])
    assert hidden.shape == (3, 77, 32) and pooled is None
    with pytest.raises(PromptError):
        sd15.encode_token_chunks([[320] * 76])
    embedding = sd15.encode_text("a photo of a cat, " * 30)
    assert embedding.embeds.shape == (1, 77 * 3, 32) and embedding.pooled is None


@pytest.mark.parametrize("variant", ["sd15", "sd2"])
def test_encoding_matches_diffusers_encode_prompt(tiny, variant):
    model = tiny(variant)
    pipe = model.pipeline("txt2img")
    theirs, _ = pipe.encode_prompt("a photo of a cat", torch.device("cpu"), 1, False)
    ours, _ = model.encode_token_chunks([model.tokenize("a photo of a cat")])
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("variant", ["sd15", "sd2"])
def test_clip_skip_takes_an_earlier_layer_with_final_layer_norm(tiny, variant):
    model = tiny(variant)
    ids = model.tokenize("a photo of a cat")
    one, _ = model.encode_token_chunks([ids], clip_skip=1)
    two, _ = model.encode_token_chunks([ids], clip_skip=2)
    assert not torch.allclose(one, two)
    pad = 0 if variant.startswith("sd2") else 49407
    row = torch.tensor([[49406, *ids, 49407] + [pad] * (75 - len(ids))])
    with torch.no_grad():
        out = model.text_encoder(input_ids=row, output_hidden_states=True)
        expected = model.text_encoder.final_layer_norm(out.hidden_states[-2])
    assert torch.equal(two, expected)
    assert torch.equal(one, out.last_hidden_state)
    with pytest.raises(InvalidRequest):
        model.encode_token_chunks([ids], clip_skip=99)


@pytest.mark.parametrize("variant,encoder", [("sd15", "clip_l"), ("sd2", "clip_h")])
def test_token_override_equals_a_vector_in_the_embedding_table(tiny, variant, encoder):
    model = tiny(variant)
    vector = torch.randn(32, generator=torch.Generator().manual_seed(5))
    ours, _ = model.encode_token_chunks([[320, TokenOverride({encoder: vector}), 2368]], clip_skip=2)
    plain, _ = model.encode_token_chunks([[320, 1000, 2368]], clip_skip=2)
    table = model.text_encoder.get_input_embeddings().weight.data
    saved = table[1000].clone()
    table[1000] = vector
    try:
        theirs, _ = model.encode_token_chunks([[320, 1000, 2368]], clip_skip=2)
    finally:
        table[1000] = saved
    assert torch.equal(ours, theirs)
    assert torch.equal(plain[:, :2], ours[:, :2])  # causal: positions before the override are unchanged
    assert not torch.allclose(plain[:, 2:], ours[:, 2:])
    other = "clip_g" if encoder == "clip_l" else "clip_l"
    with pytest.raises(PromptError, match=encoder):
        model.encode_token_chunks([[TokenOverride({other: vector})]])


# --- pipelines ----------------------------------------------------------------------------------------------


def test_pipelines_share_modules_and_run_two_steps(sd15):
    pipe = sd15.pipeline("txt2img")
    assert pipe.unet is sd15.unet and pipe.text_encoder is sd15.text_encoder and sd15.pipeline("txt2img") is pipe
    image = pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and bool(torch.isfinite(torch.from_numpy(image)).all())
    assert type(sd15.pipeline("img2img")).__name__ == "StableDiffusionImg2ImgPipeline"
    assert type(sd15.pipeline("inpaint")).__name__ == "StableDiffusionInpaintPipeline"
    with pytest.raises(InvalidRequest):
        sd15.pipeline_class("upscale")
    assert len(sd15.latent_rgb_factors) == 4 and sd15.latent_rgb_factors[0] == (0.298, 0.207, 0.208)


def test_inpainting_model_runs_inpaint_pipeline(tiny):
    from PIL import Image

    model = tiny("sd15-inpaint")
    assert model.is_inpainting
    image = Image.new("RGB", (64, 64), (128, 64, 32))
    mask = Image.new("L", (64, 64), 255)
    out = model.pipeline("inpaint")("a cat", image=image, mask_image=mask, num_inference_steps=2, height=64,
                                    width=64, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3)


def test_tiny_models_are_deterministic_per_seed(family):
    a, b, c = family.build_tiny("sd15", seed=3), family.build_tiny("sd15", seed=3), family.build_tiny("sd15", seed=4)
    assert_same_weights(a, b)
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)
    assert a.text_encoder.config.vocab_size == 49408
