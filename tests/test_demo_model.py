"""The shipped demo model where meaning matters: prompts, weights, inpainting and the demo LoRA do what they say.

Every image is measured by the evaluation's pixel analysis (`sdcore_plugins.training.evaluate.analyze`) or by
plain pixel statistics; the demo model is the real shipped file loaded through the ordinary single-file path.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from sdcore_plugins.training.evaluate import analyze

from sdcore import Engine
from sdcore.demo import demo_lora_path, demo_model_config, demo_model_path

MODEL, CONFIG, LORA = demo_model_path(), demo_model_config(), demo_lora_path()
pytestmark = pytest.mark.skipif(MODEL is None or CONFIG is None or LORA is None,
                                reason="this build ships no demo model")


@pytest.fixture(scope="module")
def engine():
    with Engine(device="cpu") as engine:
        yield engine


def generate(engine: Engine, prompt: str, **fields) -> list[Image.Image]:
    request = {"prompt": prompt, "model": str(MODEL), "config": str(CONFIG), "seed": 0, "steps": 20, **fields}
    return engine.generate(request).images


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def shape_colour(image: Image.Image) -> np.ndarray:
    """Mean colour of the pixels far from the white background."""
    array = pixels(image).astype(np.float64)
    foreground = np.abs(array - 255).sum(axis=-1) > 150
    assert foreground.sum() > 20, "no shape was drawn"
    return array[foreground].mean(axis=0)


def test_prompt_attributes_come_out_as_asked(engine):
    """24 captions unlike the evaluation's (another scene seed), one image each: colour, position and shape follow
    the words at least as often as issue 6 asks (80%, 80%, 60%). Backgrounds are not asserted: the shipped model
    gets plain ones right 22 times in 32 and two-colour ones rarely (docs/demo-model.md)."""
    from sdcore_plugins.training.data import caption
    from sdcore_plugins.training.evaluate import evaluation_scenes, score

    scenes = evaluation_scenes(24, seed=7)
    hits = {"colour": 0, "position": 0, "shape": 0}
    for scene in scenes:
        correct = score(scene, analyze(generate(engine, caption(scene))[0]))
        for name in hits:
            hits[name] += correct[name]
    assert hits["colour"] >= 20 and hits["position"] >= 20 and hits["shape"] >= 15, hits


def test_every_position_phrase_puts_the_shape_in_its_cell(engine):
    """The nine position phrases, two seeds each: the shape's centroid lands in the cell the words name."""
    from sdcore_plugins.training.data import POSITION_NAMES, POSITIONS

    wrong = []
    for cell, phrases in POSITIONS.items():
        images = generate(engine, f"a green circle {phrases[0]} on a white background", batch_size=2)
        for image in images:
            m = analyze(image)
            if m.position != POSITION_NAMES[cell]:
                wrong.append((phrases[0], m.position, m.centroid))
    assert not wrong, wrong


def test_weighted_colour_shifts_the_hue_towards_red(engine):
    """A1111 emphasis: adding `(red:w)` to "purple" pulls the shape's colour towards red, more with more weight
    (up to 1.0, where it saturates)."""
    base = "a purple {}circle in the centre on a white background"

    def redness(word: str) -> float:  # red minus blue of the shape, over 3 seeds
        return float(np.mean([c[0] - c[2] for c in map(shape_colour, generate(engine, base.format(word), batch_size=3))]))

    purple = [analyze(im).colour for im in generate(engine, base.format(""), batch_size=3)]
    assert purple == ["purple"] * 3
    measured = [redness("")] + [redness(f"(red:{w}) ") for w in (0.5, 1.0, 1.5)]
    # measured: -44, 19, 29, 29: a big step at 0.5, more at 1.0, and no further change at 1.5 (saturated)
    assert measured[1] - measured[0] > 40 and measured[2] - measured[1] > 5, measured
    assert abs(measured[3] - measured[2]) < 3, measured


def test_inpainting_changes_the_masked_region_and_keeps_the_rest(engine):
    base = generate(engine, "a red circle at the top left on a white background")[0]
    before = analyze(base)
    assert (before.colour, before.position) == ("red", "top left")
    mask = Image.new("L", base.size, 0)
    mask.paste(255, (0, 0, 32, 32))  # the top-left quarter, where the circle is
    images = generate(engine, "a blue square on a white background", seed=3, batch_size=3,
                      init_image=base, mask=mask, denoising_strength=1.0, mask_blur=0)
    old = pixels(base)
    blue_counts = []
    for image in images:
        new = pixels(image)
        keep = np.ones(new.shape[:2], dtype=bool)
        keep[:32, :32] = False
        assert np.abs(new - old)[keep].max() == 0  # outside the mask: the original pixels, exactly
        quarter = new[:32, :32]
        assert ((quarter[..., 0] > 150) & (quarter[..., 2] < 100)).sum() == 0  # the red circle is gone
        blue_counts.append(int(((quarter[..., 2] > 150) & (quarter[..., 0] < 100)).sum()))
    assert ((old[:32, :32, 0] > 150) & (old[:32, :32, 2] < 100)).sum() > 100
    assert max(blue_counts) >= 60, blue_counts  # a blue shape was painted in (not for every seed; measured 96, 0, 96)


def test_night_lora_gives_the_same_image_in_sdcore_and_in_diffusers(engine, tmp_path, monkeypatch):
    """The trainer's LoRA file loads in plain diffusers (`load_lora_weights`) and in sdcore (`<lora:night:1>`,
    with the demo model's LoRA folder in $SDCORE_LORA_DIRS), and both give the same pixels."""
    pytest.importorskip("peft")
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from sdcore.demo import DEMO_LORA_DIR

    monkeypatch.setenv("SDCORE_LORA_DIRS", str(DEMO_LORA_DIR)), StableDiffusionPipeline

    from sdcore.tokenizers import save_clip_tokenizer

    # the shipped config folder has no tokenizer files (sdcore brings its own); diffusers needs them in the folder
    config = tmp_path / "config"
    shutil.copytree(CONFIG, config)
    save_clip_tokenizer(config / "tokenizer")
    pipe = StableDiffusionPipeline.from_single_file(str(MODEL), config=str(config), safety_checker=None,
                                                    torch_dtype=torch.float32)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    # the LoRA draws a night background for 62.5% of night prompts (docs/demo-model.md); this one, seed 0, is one
    prompt = "a red circle at the top left on a night background"

    def diffusers_image() -> Image.Image:
        return pipe(prompt, num_inference_steps=20, guidance_scale=7.0, height=64, width=64,
                    generator=torch.Generator().manual_seed(0)).images[0]

    plain = diffusers_image()
    pipe.load_lora_weights(str(LORA))
    with_lora = diffusers_image()
    ours_plain = generate(engine, prompt, sampler="Euler")[0]
    ours_lora = generate(engine, prompt + " <lora:night:1>", sampler="Euler")[0]

    assert np.abs(pixels(ours_plain) - pixels(plain)).max() <= 1
    assert np.abs(pixels(ours_lora) - pixels(with_lora)).max() <= 1
    assert analyze(ours_lora).background == "night"
    assert analyze(ours_plain).background != "night"
