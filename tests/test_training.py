"""The trainer plugin (`sdcore train`, `sdcore demo`), its synthetic data, and the shipped demo model."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from sdcore_plugins.training import data as shapes  # noqa: E402
from sdcore_plugins.training.common import ImageFolder, load_checkpoint, plot_loss  # noqa: E402
from sdcore_plugins.training.evaluate import analyze, score  # noqa: E402

CAPTION = re.compile(
    r"^an? (?:(small|medium|large) )?(red|orange|yellow|green|blue|purple) (circle|square|triangle|star)"
    r"(?: (at the top left|at the top|at the top right|on the left|in the centre|in the center|in the middle|"
    r"on the right|at the bottom left|at the bottom|at the bottom right))?"
    r"(?: on an? (white|gray|black|night)(?: and (white|gray|black))? background)?$"
)


def tiny_configs() -> dict:
    from sdcore_plugins.training.train import demo_configs

    configs = demo_configs()
    configs["unet"].update(block_out_channels=[8, 16, 16], cross_attention_dim=16, sample_size=8)
    configs["vae"].update(block_out_channels=[8, 8, 8], sample_size=32)
    configs["text_encoder"].update(hidden_size=16, intermediate_size=32, projection_dim=16, num_hidden_layers=2,
                                   num_attention_heads=2)
    return configs


@pytest.fixture()
def tiny():
    from sdcore_plugins.training.train import build_components, init_vae_as_pooling

    torch.manual_seed(0)
    components = build_components(tiny_configs(), seed=0)
    init_vae_as_pooling(components.vae)
    components.vae.eval().requires_grad_(False)
    return components


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shapes")
    shapes.write_dataset(folder, 8, seed=3)
    return folder


# --- synthetic data -------------------------------------------------------------------------------------


def test_captions_match_pixels():
    rng = random.Random(11)
    for _ in range(60):
        scene = shapes.random_scene(rng)
        text = shapes.caption(scene)
        match = CAPTION.match(text)
        assert match, text
        assert (match.group(1) or "medium") == scene.size and match.group(2) == scene.colour
        assert match.group(3) == scene.shape
        measured = analyze(shapes.render(scene))
        assert all(score(scene, measured).values()), (text, measured)


def test_night_scenes_and_caption_variants():
    rng = random.Random(2)
    scene = shapes.random_scene(rng, night=True)
    assert scene.background == "night" and scene.night_dots
    assert analyze(shapes.render(scene)).background == "night"
    texts = {shapes.caption(shapes.random_scene(random.Random(5)), random.Random(i), drop=0.5) for i in range(40)}
    assert all(CAPTION.match(t) for t in texts)
    assert any(" background" not in t for t in texts)  # dropped phrases teach prompts that omit them


def test_write_dataset_is_deterministic(tmp_path, dataset_dir):
    again = shapes.write_dataset(tmp_path / "again", 8, seed=3)
    names = sorted(p.name for p in dataset_dir.iterdir())
    assert len(names) == 16 and names[0] == "000000.png" and names[1] == "000000.txt"
    for name in names:
        assert (again / name).read_bytes() == (dataset_dir / name).read_bytes()
    loaded = ImageFolder.load(dataset_dir, 32)
    assert loaded.images.shape == (8, 3, 32, 32) and loaded.images.dtype == torch.uint8
    assert all(CAPTION.match(c) for c in loaded.captions)


# --- the VAE start and the full trainer -----------------------------------------------------------------


def test_pooling_vae_init_is_block_average(tiny):
    image = shapes.render(shapes.Scene("star", "red", "large", (1, 1), "white and black"), size=32)
    x = torch.from_numpy(__import__("numpy").asarray(image).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        latents = tiny.vae.encode(x).latent_dist.mode()
        decoded = tiny.vae.decode(latents).sample
    pooled = torch.nn.functional.avg_pool2d(x, 4)
    assert torch.allclose(latents[:, :3], pooled, atol=0.02)
    assert torch.allclose(decoded, torch.nn.functional.interpolate(pooled, scale_factor=4), atol=0.03)


def test_full_training_resume_and_outputs(tmp_path, tiny, dataset_dir):
    from sdcore_plugins.training.train import DiffusionSettings, DiffusionTrainer, build_components

    data = ImageFolder.load(dataset_dir, 32)
    settings = DiffusionSettings(steps=3, batch_size=4, warmup=1, sample_every=3, checkpoint_every=2,
                                 sample_prompts=("a red circle",), sample_steps=2)
    straight = DiffusionTrainer(tiny, data, settings, tmp_path / "a", progress=False)
    straight.train()
    assert (tmp_path / "a" / "loss.png").is_file() and (tmp_path / "a" / "samples" / "step_000003.png").is_file()

    def fresh():
        components = build_components(tiny_configs(), seed=0)
        components.vae.load_state_dict(tiny.vae.state_dict())
        components.vae.register_to_config(scaling_factor=tiny.vae.config.scaling_factor)
        return components

    first = DiffusionTrainer(fresh(), data, DiffusionSettings(**{**settings.__dict__, "steps": 3}), tmp_path / "b",
                             progress=False)
    first.s.steps = 2  # stop after the checkpoint at step 2, as an interrupted run would
    first.train()
    resumed = DiffusionTrainer(fresh(), data, settings, tmp_path / "c", progress=False)
    resumed.load_state(load_checkpoint(tmp_path / "b" / "checkpoint.pt"))
    assert resumed.step == 2
    resumed.train()
    for (name, a), b in zip(straight.c.unet.state_dict().items(), resumed.c.unet.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    assert straight.losses == pytest.approx(resumed.losses, abs=1e-6)


@pytest.mark.parametrize("pure_noise_loss", ["epsilon", "image"])
def test_pure_noise_samples_are_the_samplers_first_step(tmp_path, tiny, dataset_dir, pure_noise_loss):
    """`pure_noise_fraction`: those samples get t = T-1 and an input with no trace of the image (what a sampler
    feeds the model first), and the ε target that leads from that input to the true image; the rest of the batch
    (latents, noise, captions) is drawn exactly as without the option. Their loss is the ε error, or the error of
    the image the prediction implies."""
    from sdcore_plugins.training.train import DiffusionSettings, DiffusionTrainer

    data = ImageFolder.load(dataset_dir, 32)
    settings = DiffusionSettings(steps=1, batch_size=6, sample_every=0, checkpoint_every=0)
    plain = DiffusionTrainer(tiny, data, settings, tmp_path / "plain", progress=False)
    pure = DiffusionTrainer(tiny, data, DiffusionSettings(**{**settings.__dict__, "pure_noise_fraction": 1.0,
                                                             "pure_noise_loss": pure_noise_loss}),
                            tmp_path / "pure", progress=False)
    z0, noise0, t0, ids0, keep0 = plain.batch(5)
    z, noise, t, ids, keep = pure.batch(5)
    assert keep0.all() and not keep.any()
    assert torch.equal(z, z0) and torch.equal(noise, noise0) and torch.equal(ids, ids0)
    assert (t == 999).all() and not (t0 == 999).all()

    seen = {}
    hook = tiny.unet.register_forward_pre_hook(lambda module, args, kwargs: seen.update(x=args[0]) or None,
                                               with_kwargs=True)
    with torch.no_grad():
        loss = pure.loss(z, noise, t, ids, keep)
    hook.remove()
    a = pure.acp[999]
    assert torch.allclose(seen["x"], (1 - a).sqrt() * noise)  # no signal at all
    with torch.no_grad():
        hidden = tiny.text_encoder(input_ids=ids).last_hidden_state
        pred = tiny.unet(seen["x"], t, encoder_hidden_states=hidden).sample
    if pure_noise_loss == "epsilon":
        target = noise - (a / (1 - a)).sqrt() * z  # √ᾱ·z + √(1-ᾱ)·target = the input: it leads to the true image
        expected = (pred - target).pow(2).mean()  # min-SNR weight 1 at t = 999
    else:
        predicted_image = (seen["x"] - (1 - a).sqrt() * pred) / a.sqrt()
        expected = (predicted_image - z).pow(2).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


# --- LoRA -----------------------------------------------------------------------------------------------


def _lora_trainer(components, data, work, steps=2, **kwargs):
    from sdcore_plugins.training.lora import LoraSettings, LoraTrainer

    settings = LoraSettings(rank=2, alpha=1.0, steps=steps, batch_size=4, lr=5e-2, warmup=1, **kwargs)
    return LoraTrainer(components, data, settings, work, progress=False)


def test_lora_file_is_kohya_layout_and_loads_in_diffusers(tmp_path, tiny, dataset_dir):
    pytest.importorskip("peft")
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file

    trainer = _lora_trainer(tiny, ImageFolder.load(dataset_dir, 32), tmp_path / "work")
    trainer.train()
    out = trainer.save(tmp_path / "shapes.safetensors")
    trainer.close()
    state = load_file(str(out))
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in state}
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k" in names
    assert "lora_unet_up_blocks_1_attentions_0_proj_in" in names
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    for name in names:
        assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= set(state)
        assert state[f"{name}.lora_down.weight"].shape[0] == 2 and float(state[f"{name}.alpha"]) == 1.0
    assert state["lora_unet_up_blocks_1_attentions_0_proj_in.lora_down.weight"].ndim == 4  # a 1×1 conv

    pipe = StableDiffusionPipeline(vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer,
                                   unet=tiny.unet, scheduler=DDIMScheduler.from_config(tiny.scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    before = run()
    pipe.load_lora_weights(str(out))
    assert abs(run() - before).max() > 1e-4


def test_lora_merge_equals_live_network_and_restores(tmp_path, tiny, dataset_dir):
    from sdcore_plugins.training.lora import applied_lora

    trainer = _lora_trainer(tiny, ImageFolder.load(dataset_dir, 32), tmp_path / "work")
    trainer.train()
    out = trainer.save(tmp_path / "l.safetensors")
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([500])
    ids = tiny.tokenizer(["a red star"], padding="max_length", max_length=77, return_tensors="pt").input_ids

    def predict():
        with torch.no_grad():
            hidden = tiny.text_encoder(input_ids=ids).last_hidden_state
            return tiny.unet(x, t, encoder_hidden_states=hidden).sample

    live = predict()
    trainer.close()
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in (tiny.unet, tiny.text_encoder):  # the peft layers are gone, not only switched off
        assert not any(isinstance(m, BaseTunerLayer) for m in module.modules())
        assert not hasattr(module, "peft_config")
    plain = predict()
    original = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    with applied_lora(tiny.unet, tiny.text_encoder, out) as patched:
        assert patched == len(trainer.network.loras)
        merged = predict()
    assert torch.allclose(merged, live, atol=2e-3)  # the file is fp16
    assert not torch.allclose(plain, live, atol=1e-4)
    assert all(torch.equal(v, tiny.unet.state_dict()[k]) for k, v in original.items())


def test_lora_resume_matches_uninterrupted(tmp_path, tiny, dataset_dir):
    data = ImageFolder.load(dataset_dir, 32)
    straight = _lora_trainer(tiny, data, tmp_path / "a", steps=4)
    straight.train()
    expected = {k: v.clone() for k, v in straight.network.state_dict().items()}
    straight.close()

    first = _lora_trainer(tiny, data, tmp_path / "b", steps=4, checkpoint_every=2)
    first.s.steps = 2
    first.train()
    first.close()
    second = _lora_trainer(tiny, data, tmp_path / "c", steps=4)
    second.resume(tmp_path / "b" / "checkpoint.pt")
    assert second.step == 2
    second.train()
    second.close()
    for key, value in second.network.state_dict().items():
        assert torch.allclose(value, expected[key], atol=1e-6), key


def test_cli_train_lora_on_an_engine_model(tmp_path, dataset_dir):
    from click.testing import CliRunner
    from safetensors.torch import load_file
    from sdcore_plugins.training import train_group

    family = pytest.importorskip("sdcore_plugins.sd1.family").SD1Family()
    model_dir = family.save_diffusers(family.build_tiny("sd15"), tmp_path / "tiny-sd15")
    out = tmp_path / "cli.safetensors"
    result = CliRunner().invoke(train_group, [
        "lora", "--model", str(model_dir), "--data", str(dataset_dir), "--rank", "2", "--alpha", "2",
        "--steps", "2", "--batch-size", "2", "--out", str(out), "--threads", "1", "--quiet",
        "--checkpoint-every", "1",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert out.is_file() and any(k.startswith("lora_te_") for k in load_file(str(out)))
    assert (tmp_path / "cli-training" / "loss.png").is_file()
    assert load_checkpoint(tmp_path / "cli-training" / "checkpoint.pt")["step"] == 2


def test_train_lora_without_peft_says_what_to_install(tmp_path, dataset_dir, monkeypatch):
    import importlib.util

    from click.testing import CliRunner
    from sdcore_plugins.training import train_group

    real_find_spec = importlib.util.find_spec
    # peft cannot be uninstalled for one test: hide it from the check the command makes first
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real_find_spec(name, *a))
    result = CliRunner().invoke(train_group, ["lora", "--data", str(dataset_dir), "--out", str(tmp_path / "x.safetensors"),
                                              "--quiet"])
    assert result.exit_code == 1
    assert "`sdcore train lora` needs peft: pip install 'sdcore[train]'" in result.output
    assert not (tmp_path / "x.safetensors").exists()


def test_loss_curve_png(tmp_path):
    from PIL import Image

    path = plot_loss([1.0 / (1 + i) for i in range(300)], tmp_path / "loss.png")
    with Image.open(path) as image:
        assert image.size == (640, 400)


# --- the shipped demo model -----------------------------------------------------------------------------


def test_demo_model_draws_what_it_is_asked():
    from sdcore import Engine
    from sdcore.demo import demo_model_config, demo_model_path

    model, config = demo_model_path(), demo_model_config()
    if model is None or config is None:
        pytest.skip("this build ships no demo model")
    assert model.stat().st_size <= 15_000_000
    with Engine(device="cpu") as engine:
        result = engine.generate({
            "prompt": "a red circle at the top left on a white background", "model": str(model),
            "config": str(config), "seed": 0, "steps": 20, "width": 64, "height": 64, "batch_size": 3,
        })
    measured = [analyze(image) for image in result.images]
    # colour and background come out for every seed; position is right for seed 0 but not yet for every
    # seed (see docs/demo-model.md for the measured accuracy)
    assert all(m.colour == "red" and m.background == "white" for m in measured), measured
    assert measured[0].position == "top left", measured[0]
