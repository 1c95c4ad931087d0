"""The engine on a tiny SD 1.x model: modes, seeds, events, cancellation, failures, caching."""

import threading

import numpy as np
import pytest
from PIL import Image

from sdcore import (
    CancelledEvent,
    Engine,
    ErrorEvent,
    GenerationRequest,
    PreviewEvent,
    ProgressEvent,
    QueuedEvent,
    ResultEvent,
    StartedEvent,
    hookimpl,
)
from sdcore.errors import ImageError, JobCancelled, ModelNotFound, WrongModelType
from sdcore.infotext import parse_infotext

BASE = dict(prompt="a red circle", steps=3, width=64, height=64, sampler="Euler")


def arr(image):
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def engine(tiny_sd1_model):
    with Engine(device="cpu", default_model=tiny_sd1_model) as engine:
        yield engine


def test_txt2img_image_and_infotext(engine):
    result = engine.generate(GenerationRequest(**BASE, seed=42))
    assert len(result.images) == 1 and result.images[0].size == (64, 64)
    assert result.seeds == [42]
    info = parse_infotext(result.infotexts[0])
    assert info.prompt == "a red circle"
    assert info.params["Steps"] == "3" and info.params["Sampler"] == "Euler" and info.params["Seed"] == "42"
    assert info.params["Size"] == "64x64" and info.params["RNG"] == "CPU"
    assert len(info.params["Model hash"]) == 10
    assert arr(result.images[0]).std() > 1  # a picture, not a flat colour


def test_same_seed_same_image_bit_for_bit(engine):
    a = engine.generate(GenerationRequest(**BASE, seed=7)).images[0]
    b = engine.generate(GenerationRequest(**BASE, seed=7)).images[0]
    c = engine.generate(GenerationRequest(**BASE, seed=8)).images[0]
    assert np.array_equal(arr(a), arr(b))
    assert not np.array_equal(arr(a), arr(c))


def test_batch_image_i_uses_seed_plus_i(engine):
    batch = engine.generate(GenerationRequest(**BASE, seed=100, batch_size=2, batch_count=2))
    assert batch.seeds == [100, 101, 102, 103]
    single = engine.generate(GenerationRequest(**BASE, seed=103)).images[0]
    # same noise; batched matmuls may round differently, so compare closely rather than bit for bit
    assert np.abs(arr(batch.images[3]) - arr(single)).max() <= 2
    assert [parse_infotext(t).params["Seed"] for t in batch.infotexts] == ["100", "101", "102", "103"]


def test_random_seed_is_recorded(engine):
    result = engine.generate(GenerationRequest(**BASE, seed=-1))
    seed = result.seeds[0]
    assert 0 <= seed < 2**32 and result.request.seed == seed
    again = engine.generate(result.request).images[0]
    assert np.array_equal(arr(again), arr(result.images[0]))


def test_subseed_variation(engine):
    plain = engine.generate(GenerationRequest(**BASE, seed=5)).images[0]
    varied = engine.generate(GenerationRequest(**BASE, seed=5, subseed=9, subseed_strength=0.5))
    zero = engine.generate(GenerationRequest(**BASE, seed=5, subseed=9, subseed_strength=0.0)).images[0]
    assert np.array_equal(arr(plain), arr(zero))
    assert not np.array_equal(arr(plain), arr(varied.images[0]))
    params = parse_infotext(varied.infotexts[0]).params
    assert params["Variation seed"] == "9" and params["Variation seed strength"] == "0.5"


def test_events_in_order_with_progress_every_step(engine):
    job = engine.submit(GenerationRequest(**BASE, seed=1, batch_count=2, preview_every=1))
    events = list(job.events(timeout=120))
    assert isinstance(events[0], QueuedEvent) and isinstance(events[1], StartedEvent)
    assert isinstance(events[-1], ResultEvent)
    assert [e.seq for e in events] == list(range(len(events)))
    progress = [e for e in events if isinstance(e, ProgressEvent)]
    assert [(p.step, p.total) for p in progress] == [(i, 6) for i in range(1, 7)]
    previews = [e for e in events if isinstance(e, PreviewEvent)]
    assert len(previews) == 4 and previews[0].image.size == (8, 8)


def test_async_events(engine):
    import asyncio

    async def consume():
        job = engine.submit(GenerationRequest(**BASE, seed=2))
        types = [event.type async for event in job]
        return types, (await job.aresult()).seeds

    types, seeds = asyncio.run(consume())
    assert types == ["queued", "started", "progress", "progress", "progress", "result"]
    assert seeds == [2]


class Gate:
    """Blocks the first denoising step until released, so a test can act while a job runs."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()
        self.steps_seen = 0
        self.decoded = False

    @hookimpl
    def before_denoise_step(self, state):
        self.steps_seen += 1
        self.entered.set()
        assert self.release.wait(30)


def test_cancel_running_job_stops_between_steps_and_decodes_nothing(tiny_sd1_model, monkeypatch):
    gate = Gate()
    decoded = []
    import sdcore.generation as generation

    original = generation.vae_decode
    monkeypatch.setattr(generation, "vae_decode", lambda *a, **k: decoded.append(1) or original(*a, **k))
    with Engine(device="cpu", default_model=tiny_sd1_model, plugins=[gate]) as engine:
        job = engine.submit(GenerationRequest(**{**BASE, "steps": 10}, seed=1))
        queued = engine.submit(GenerationRequest(**BASE, seed=2))
        assert gate.entered.wait(60)
        assert queued.cancel() is True
        assert job.cancel() is True
        gate.release.set()
        events = list(job.events(timeout=60))
        assert isinstance(events[-1], CancelledEvent)
        assert gate.steps_seen == 1 and decoded == []
        with pytest.raises(JobCancelled):
            job.result()
        assert [e.type for e in queued.history] == ["queued", "cancelled"]
        assert job.cancel() is False  # already over
        # the engine keeps serving
        assert engine.generate(GenerationRequest(**BASE, seed=3)).seeds == [3]


def test_a_failing_job_fails_alone(engine, tmp_path):
    bad = engine.submit(GenerationRequest(**BASE, model=str(tmp_path / "missing.safetensors")))
    good = engine.submit(GenerationRequest(**BASE, seed=4))
    events = list(bad.events(timeout=60))
    assert isinstance(events[-1], ErrorEvent)
    assert events[-1].error["code"] == "model_not_found"
    with pytest.raises(ModelNotFound, match="missing.safetensors"):
        bad.result()
    assert good.result(timeout=120).seeds == [4]


class Exploding:
    @hookimpl
    def after_denoise_step(self, state):
        if state.context.request.prompt == "boom":
            raise RuntimeError("plugin bug")


def test_unexpected_exception_becomes_error_event(tiny_sd1_model):
    with Engine(device="cpu", default_model=tiny_sd1_model, plugins=[Exploding()]) as engine:
        job = engine.submit(GenerationRequest(**{**BASE, "prompt": "boom"}))
        events = list(job.events(timeout=60))
        assert events[-1].error == {"code": "internal_error", "type": "RuntimeError", "message": "plugin bug"}
        assert engine.generate(GenerationRequest(**BASE, seed=1)).seeds == [1]


def test_lora_given_as_model_is_refused(engine, tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "style.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(WrongModelType, match="is a LoRA, not a Stable Diffusion model"):
        engine.generate(GenerationRequest(**BASE, model=str(path)))


def make_init(size=64):
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_img2img_strength(engine):
    init = make_init()
    low = engine.generate(GenerationRequest(**BASE, seed=1, init_image=init, denoising_strength=0.2))
    high = engine.generate(GenerationRequest(**BASE, seed=1, init_image=init, denoising_strength=1.0))
    assert parse_infotext(low.infotexts[0]).params["Denoising strength"] == "0.2"
    d_low = np.abs(arr(low.images[0]) - arr(init)).mean()
    d_high = np.abs(arr(high.images[0]) - arr(init)).mean()
    assert d_low < d_high


def test_inpaint_keeps_pixels_outside_the_mask(engine):
    init = make_init()
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    result = engine.generate(GenerationRequest(**BASE, seed=1, init_image=init, mask=mask, mask_blur=0,
                                               denoising_strength=1.0))
    out, original = arr(result.images[0]), arr(init)
    inside = np.zeros((64, 64), bool)
    inside[16:48, 16:48] = True
    assert np.array_equal(out[~inside], original[~inside])
    assert np.abs(out[inside] - original[inside]).mean() > 10
    params = parse_infotext(result.infotexts[0]).params
    assert params["Mask blur"] == "0"


def test_inpaint_only_masked_with_padding(engine):
    init = make_init(128)
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (90, 90, 110, 110))
    result = engine.generate(GenerationRequest(**BASE, seed=1, init_image=init, mask=mask, mask_blur=2,
                                               inpaint_full_res=True, inpaint_full_res_padding=8))
    out, original = arr(result.images[0]), arr(init)
    assert result.images[0].size == (128, 128)
    assert np.array_equal(out[:70], original[:70]) and np.array_equal(out[:, :70], original[:, :70])
    assert np.abs(out[95:105, 95:105] - original[95:105, 95:105]).mean() > 10
    params = parse_infotext(result.infotexts[0]).params
    assert params["Inpaint area"] == "Only masked" and params["Masked area padding"] == "8"


def test_mask_size_mismatch_is_refused_at_submit(engine):
    with pytest.raises(ImageError, match="mask is 32x32 but the init image is 64x64"):
        engine.submit(GenerationRequest(**BASE, init_image=make_init(), mask=Image.new("L", (32, 32), 255)))


def test_models_are_cached_and_share_components(engine, tiny_sd1_model):
    model = engine.load_model(str(tiny_sd1_model))
    assert engine.load_model(str(tiny_sd1_model)) is model
    txt, img = model.pipeline("txt2img"), model.pipeline("img2img")
    assert txt.unet is img.unet is model.unet and txt.vae is img.vae
    assert type(txt).__name__ == "StableDiffusionPipeline" and type(img).__name__ == "StableDiffusionImg2ImgPipeline"


def test_model_cache_budget_evicts_least_recently_used(tiny_sd1_model, tiny_sd1_folder):
    with Engine(device="cpu", model_cache_bytes=1) as engine:
        first = engine.load_model(str(tiny_sd1_model))
        engine.load_model(str(tiny_sd1_folder))
        assert [m.name for m in engine.models.models()] == [tiny_sd1_folder.name]
        assert engine.load_model(str(tiny_sd1_model)) is not first


@pytest.fixture(scope="module")
def inpaint_engine(sdcore_model_dir):
    from sdcore.testing.models import make_tiny_model

    path = make_tiny_model(sdcore_model_dir, family="sd1", variant="sd15-inpaint")
    with Engine(device="cpu", default_model=path) as engine:
        yield engine


def test_nine_channel_inpainting_model(inpaint_engine):
    model = inpaint_engine.load_model()
    assert model.is_inpainting and model.variant == "sd15-inpaint"
    init = make_init()
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    result = inpaint_engine.generate(GenerationRequest(**BASE, seed=1, init_image=init, mask=mask, mask_blur=0))
    out, original = arr(result.images[0]), arr(init)
    assert np.array_equal(out[:, 32:], original[:, 32:])
    assert np.abs(out[:, :32] - original[:, :32]).mean() > 10
    # txt2img on an inpainting model works too (everything masked, as A1111 does)
    assert inpaint_engine.generate(GenerationRequest(**BASE, seed=1)).images[0].size == (64, 64)


def test_outpainting_by_canvas_and_mask(engine):
    from sdcore.images import extend_canvas

    init = make_init(64).crop((0, 0, 32, 64))
    canvas, mask = extend_canvas(init, right=32)
    result = engine.generate(GenerationRequest(**BASE, seed=1, init_image=canvas, mask=mask, mask_blur=0,
                                               denoising_strength=1.0))
    out = arr(result.images[0])
    assert result.images[0].size == (64, 64)
    assert np.array_equal(out[:, :32], arr(init))  # the original part is untouched
    assert out[:, 32:].std() > 1  # the new part is generated


def test_loaded_model_peeks_without_loading(tiny_sd1_model, tiny_sd1_folder):
    with Engine(device="cpu", default_model=tiny_sd1_model) as engine:
        request = GenerationRequest(**BASE)
        assert engine.loaded_model(request) is None
        model = engine.load_model()
        engine.load_model(str(tiny_sd1_folder))
        assert engine.loaded_model(request) is model
        # peeking does not refresh the model's place in the least-recently-used order
        assert [m.name for m in engine.models.models()][0] == model.name


def test_finished_jobs_can_be_forgotten_and_are_bounded(engine, monkeypatch):
    import sdcore.engine as engine_module

    job = engine.submit(GenerationRequest(**BASE, seed=1))
    assert engine.forget(job.id) is False or job.done  # a running job is kept
    job.result(timeout=120)
    assert engine.job(job.id) is job and engine.forget(job.id) is True and engine.job(job.id) is None
    monkeypatch.setattr(engine_module, "KEEP_FINISHED_JOBS", 1)
    first = engine.submit(GenerationRequest(**BASE, seed=2))
    first.result(timeout=120)
    second = engine.submit(GenerationRequest(**BASE, seed=3))
    second.result(timeout=120)
    engine.submit(GenerationRequest(**BASE, seed=4)).result(timeout=120)
    assert engine.job(first.id) is None and engine.job(second.id) is second
