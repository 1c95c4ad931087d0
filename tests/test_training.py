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
    assert len(names) == 24 and names[:3] == ["000000.mask.png", "000000.png", "000000.txt"]
    for name in names:
        assert (again / name).read_bytes() == (dataset_dir / name).read_bytes()
    loaded = ImageFolder.load(dataset_dir, 32)
    assert loaded.images.shape == (8, 3, 32, 32) and loaded.images.dtype == torch.uint8
    assert all(CAPTION.match(c) for c in loaded.captions)
    assert [p.name for p in loaded.paths][:2] == ["000000.png", "000001.png"]  # masks are not images
    assert loaded.masks is not None and loaded.masks.shape == (8, 1, 32, 32) and bool(loaded.has_mask.all())


def test_masks_cover_exactly_the_shape():
    """`NAME.mask.png` is where the shape is: the pixels that differ from the background, and nothing else."""
    import numpy as np

    rng = random.Random(5)
    for _ in range(20):
        scene = shapes.random_scene(rng)
        image = np.asarray(shapes.render(scene)).astype(np.float32)
        mask = np.asarray(shapes.render_mask(scene)).astype(np.float32) / 255.0
        top, bottom = (np.array(shapes.rgb(c), dtype=np.float32) for c in scene.background_colours)
        background = np.where(np.arange(64)[:, None, None] < 32, top, bottom)
        # anti-aliased edges: each pixel is the mask-weighted blend of the shape's colour and the background
        blend = mask[..., None] * np.array(shapes.rgb(scene.colour), dtype=np.float32) + (1 - mask[..., None]) * background
        assert np.abs(blend - image).max() <= 2.0  # both images are rounded to 8 bits
        assert (mask > 0).sum() >= (np.abs(image - background).max(axis=2) > 0).sum()
        assert 0.01 < mask.mean() < 0.2


def test_a_folder_without_masks_has_none(tmp_path, dataset_dir):
    for path in dataset_dir.glob("*"):
        if not path.name.endswith(".mask.png"):
            (tmp_path / path.name).write_bytes(path.read_bytes())
    loaded = ImageFolder.load(tmp_path, 32)
    assert len(loaded) == 8 and loaded.masks is None and loaded.has_mask is None


# --- token grounding ------------------------------------------------------------------------------------

GROUNDING_WORDS = ("circle", "square", "triangle", "star", "left", "right", "top", "bottom", "centre")


def test_grounding_loss_is_attention_outside_the_mask():
    from sdcore_plugins.training.grounding import grounding_loss

    # one sample, a 2×2 image, three tokens (ids 7, 8, 9); the mask is the top-left cell
    probs = torch.tensor([[[0.0, 1.0, 0.25], [1.0, 0.0, 0.25], [0.0, 0.0, 0.25], [0.0, 0.0, 0.25]]])
    masks = torch.zeros(1, 1, 4, 4)
    masks[..., :2, :2] = 1.0
    ids = torch.tensor([[7, 8, 9]])
    # token 8 looks only inside (0), token 9 evenly (1 - 1/4); token 7 is not grounded
    assert float(grounding_loss([probs], ids, torch.tensor([8, 9]), masks)) == pytest.approx(0.375)
    assert float(grounding_loss([probs], ids, torch.tensor([8]), masks)) == pytest.approx(0.0)
    assert float(grounding_loss([probs, probs], ids, torch.tensor([9]), masks)) == pytest.approx(0.75)
    assert float(grounding_loss([probs], ids, torch.tensor([42]), masks)) == 0.0  # nothing to ground


def test_recording_attention_changes_nothing_and_is_removed(tiny):
    from sdcore_plugins.training.grounding import recording_cross_attention

    unet = tiny.unet.eval()
    before = {name: type(p) for name, p in unet.attn_processors.items()}
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(2, 77, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = unet(x, 500, encoder_hidden_states=hidden).sample
        with recording_cross_attention(unet) as recorder:
            recorder.maps = []
            recorded = unet(x, 500, encoder_hidden_states=hidden).sample
    assert torch.allclose(plain, recorded, atol=1e-5)
    cross_layers = [name for name in before if ".attn2." in name]
    assert len(recorder.maps) == len(cross_layers) == 7  # down 2, mid 1, up 2 × 2
    assert sorted(m.shape[1] for m in recorder.maps) == [4] * 4 + [16] * 3  # the 2×2 and 4×4 levels
    for m in recorder.maps:
        assert m.shape[0] == 2 and m.shape[2] == 77
        assert torch.allclose(m.sum(dim=2), torch.ones(2, m.shape[1]), atol=1e-5)
    assert {name: type(p) for name, p in unet.attn_processors.items()} == before


def test_grounding_training_moves_attention_into_the_mask(tmp_path, tiny, dataset_dir):
    from sdcore_plugins.training.grounding import grounding_loss, recording_cross_attention
    from sdcore_plugins.training.train import DiffusionSettings, DiffusionTrainer

    data = ImageFolder.load(dataset_dir, 32)
    settings = DiffusionSettings(steps=40, batch_size=8, lr=3e-3, warmup=1, sample_every=0, checkpoint_every=0,
                                 caption_dropout=0.0, grounding_weight=1.0, grounding_words=GROUNDING_WORDS)
    trainer = DiffusionTrainer(tiny, data, settings, tmp_path / "g", progress=False)
    assert trainer.grounded is not None and len(trainer.grounded) == len(GROUNDING_WORDS)  # one token each

    def measured() -> float:
        z, noise, t, ids, keep = trainer.batch(0)
        with torch.no_grad(), recording_cross_attention(tiny.unet) as recorder:
            recorder.maps = []
            a = trainer.acp[t].view(-1, 1, 1, 1)
            hidden = tiny.text_encoder(input_ids=ids).last_hidden_state
            tiny.unet(a.sqrt() * z + (1 - a).sqrt() * noise, t, encoder_hidden_states=hidden)
        return float(grounding_loss(recorder.maps, ids, trainer.grounded, data.masks[trainer.batch_index(0)] / 255))

    start = measured()
    assert start > 0.8  # attention starts spread over the image; the shapes cover a few percent of it
    trainer.train()
    assert measured() < start - 0.1


def test_grounding_without_masks_says_what_is_missing(tmp_path, tiny, dataset_dir):
    from sdcore_plugins.training.train import DiffusionSettings, DiffusionTrainer

    for path in dataset_dir.glob("*"):
        if not path.name.endswith(".mask.png"):
            (tmp_path / path.name).write_bytes(path.read_bytes())
    settings = DiffusionSettings(steps=1, batch_size=2, grounding_weight=0.1, grounding_words=GROUNDING_WORDS)
    with pytest.raises(ValueError, match=r"NAME\.mask\.png"):
        DiffusionTrainer(tiny, ImageFolder.load(tmp_path, 32), settings, tmp_path / "w", progress=False)


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


def test_demo_train_runs_both_stages_and_the_lora(tmp_path, monkeypatch):
    """`sdcore demo train` end to end at a few steps: stage 1 from scratch, stage 2 (token grounding) fine-tunes
    stage 1's file loaded with its config folder, the LoRA trains on the result, and the model loads."""
    from click.testing import CliRunner
    from safetensors.torch import load_file
    from sdcore_plugins.training import demo, runner

    monkeypatch.setitem(runner.DEMO_RECIPE, "batch_size", 4)
    monkeypatch.setitem(runner.DEMO_RECIPE, "lora_count", 8)
    monkeypatch.setitem(runner.DEMO_RECIPE, "lora_batch_size", 2)
    out = tmp_path / "demo" / "model.safetensors"
    result = CliRunner().invoke(demo, [
        "train", "--work-dir", str(tmp_path / "work"), "--out", str(out), "--count", "12", "--vae-steps", "1",
        "--steps", "2", "--grounding-steps", "2", "--lora-steps", "1", "--threads", "1", "--quiet",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    work = tmp_path / "work"
    stage1 = load_checkpoint(work / "model" / "checkpoint.pt")
    stage2 = load_checkpoint(work / "grounding" / "checkpoint.pt")
    assert stage1["settings"]["grounding_weight"] == 0.0 and stage1["step"] == 2
    assert stage2["settings"]["grounding_weight"] == runner.DEMO_RECIPE["grounding_weight"] and stage2["step"] == 2
    assert "left" in stage2["settings"]["grounding_words"] and "red" in stage2["settings"]["grounding_words"]
    base, final = load_file(str(work / "base" / "model.safetensors")), load_file(str(out))
    assert base.keys() == final.keys()
    changed = [k for k in base if not torch.equal(base[k], final[k])]
    assert any(k.startswith("model.diffusion_model.") for k in changed)
    assert not any(k.startswith("first_stage_model.") for k in changed)  # the VAE stays frozen
    assert (out.parent / "config" / "unet" / "config.json").is_file()
    assert any(k.startswith("lora_unet_") for k in load_file(str(out.parent / "loras" / "night.safetensors")))


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
    assert all((m.colour, m.position) == ("red", "top left") for m in measured), measured
