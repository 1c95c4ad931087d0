"""Each hook of sdcore.hookspecs, exercised by a plugin object on a tiny model."""

import numpy as np
import pytest
from pydantic import BaseModel

from sdcore import Engine, GenerationRequest, hookimpl
from sdcore.conditioning import Conditioning, ScheduledText
from sdcore.errors import InvalidRequest
from sdcore.infotext import parse_infotext
from sdcore.samplers import Sampler

BASE = dict(prompt="a red circle", steps=3, width=64, height=64, sampler="Euler", seed=11)


def image_of(engine, **changes):
    return np.asarray(engine.generate(GenerationRequest(**{**BASE, **changes})).images[0], dtype=np.int16)


@pytest.fixture(scope="module")
def plain(tiny_sd1_model):
    with Engine(device="cpu", default_model=tiny_sd1_model) as engine:
        yield engine


def engine_with(tiny_sd1_model, *plugins):
    return Engine(device="cpu", default_model=tiny_sd1_model, plugins=list(plugins))


def test_prepare_request_can_refuse_and_change(tiny_sd1_model):
    class Policy:
        @hookimpl
        def prepare_request(self, request, engine):
            if "forbidden" in request.prompt:
                raise InvalidRequest("this prompt is not allowed here")
            request.steps = 2

    with engine_with(tiny_sd1_model, Policy()) as engine:
        with pytest.raises(InvalidRequest, match="not allowed"):
            engine.submit(GenerationRequest(prompt="forbidden fruit"))
        result = engine.generate(GenerationRequest(**BASE))
        assert parse_infotext(result.infotexts[0]).params["Steps"] == "2"


def test_on_model_loaded_once_per_load(tiny_sd1_model):
    class Counter:
        loads = []

        @hookimpl
        def on_model_loaded(self, model, engine):
            self.loads.append(model.name)

    counter = Counter()
    with engine_with(tiny_sd1_model, counter) as engine:
        engine.generate(GenerationRequest(**BASE))
        engine.generate(GenerationRequest(**BASE))
    assert counter.loads == [tiny_sd1_model.stem]


def test_run_generation_wrapper_sees_every_batch(tiny_sd1_model, plain):
    class Mirror:
        calls = 0

        @hookimpl(wrapper=True)
        def run_generation(self, context):
            output = yield
            self.calls += 1
            output.images = [image.transpose(0) for image in output.images]  # mirror left-right
            return output

    mirror = Mirror()
    with engine_with(tiny_sd1_model, mirror) as engine:
        result = engine.generate(GenerationRequest(**BASE, batch_count=2))
    assert mirror.calls == 2
    expected = image_of(plain)[:, ::-1]
    assert np.array_equal(np.asarray(result.images[0], dtype=np.int16), expected)


def test_encode_prompts_first_result_wins(tiny_sd1_model, plain):
    class Replace:
        @hookimpl
        def encode_prompts(self, context):
            model = context.model
            return Conditioning(positive=[ScheduledText.constant(model.encode_text("a blue square"))],
                                negative=ScheduledText.constant(model.encode_text("")))

    with engine_with(tiny_sd1_model, Replace()) as engine:
        replaced = image_of(engine)
    assert np.array_equal(replaced, image_of(plain, prompt="a blue square"))
    assert not np.array_equal(replaced, image_of(plain))


def test_prepare_conditioning_negative_equal_to_positive_cancels_guidance(tiny_sd1_model):
    class NoGuidance:
        @hookimpl
        def prepare_conditioning(self, conditioning, context):
            conditioning.negative = ScheduledText(conditioning.positive[0].schedule)

    with engine_with(tiny_sd1_model, NoGuidance()) as engine:
        assert np.array_equal(image_of(engine, cfg_scale=2.0), image_of(engine, cfg_scale=12.0))


def test_prepare_latents_replaces_the_noise(tiny_sd1_model):
    class FixedStart:
        @hookimpl
        def prepare_latents(self, state):
            state.latents = state.latents * 0 + 0.5

    with engine_with(tiny_sd1_model, FixedStart()) as engine:
        assert np.array_equal(image_of(engine, seed=1), image_of(engine, seed=2))


def test_before_and_after_denoise_step(tiny_sd1_model, plain):
    class Recorder:
        def __init__(self):
            self.before, self.after = [], []

        @hookimpl
        def before_denoise_step(self, state):
            self.before.append((state.step, state.total_steps, state.guidance_scale))
            state.guidance_scale = 1.0  # changes the image: no classifier-free guidance

        @hookimpl
        def after_denoise_step(self, state):
            self.after.append(float(state.latents.std()))

    recorder = Recorder()
    with engine_with(tiny_sd1_model, recorder) as engine:
        changed = image_of(engine, steps=4)
    assert recorder.before == [(0, 4, 7.0), (1, 4, 7.0), (2, 4, 7.0), (3, 4, 7.0)]
    assert len(recorder.after) == 4
    assert np.array_equal(changed, image_of(plain, steps=4, cfg_scale=1.0))


def test_prepare_infotext_adds_quoted_fields(tiny_sd1_model):
    class Field:
        @hookimpl
        def prepare_infotext(self, params, context):
            params["My plugin"] = "a, b: c"

    with engine_with(tiny_sd1_model, Field()) as engine:
        text = engine.generate(GenerationRequest(**BASE)).infotexts[0]
    assert 'My plugin: "a, b: c"' in text
    assert parse_infotext(text).params["My plugin"] == "a, b: c"


def test_on_generation_end_gets_the_result(tiny_sd1_model):
    class Listener:
        results = []

        @hookimpl
        def on_generation_end(self, result, engine):
            self.results.append(result)

    listener = Listener()
    with engine_with(tiny_sd1_model, listener) as engine:
        result = engine.generate(GenerationRequest(**BASE))
    assert listener.results == [result]


def test_register_samplers_adds_a_name(tiny_sd1_model, plain):
    class MySampler:
        @hookimpl
        def register_samplers(self, register):
            register(Sampler(name="Plain Euler", scheduler_class="EulerDiscreteScheduler", scheduler_kwargs={},
                             schedule_types=("Automatic",)))

    with engine_with(tiny_sd1_model, MySampler()) as engine:
        assert "Plain Euler" in engine.samplers.names()
        assert np.array_equal(image_of(engine, sampler="Plain Euler"), image_of(plain, sampler="Euler"))


def test_register_request_options_validates_and_records(tiny_sd1_model):
    class Strength(BaseModel):
        amount: float = 0.5

        def infotext(self):
            return {"Strength amount": self.amount}

    class Plugin:
        @hookimpl
        def register_request_options(self, register):
            register("strength", Strength)

    with engine_with(tiny_sd1_model, Plugin()) as engine:
        with pytest.raises(InvalidRequest, match="options.strength.amount: Input should be a valid number"):
            engine.submit(GenerationRequest(**BASE, options={"strength": {"amount": "lots"}}))
        with pytest.raises(InvalidRequest, match="Unknown option 'strenght'; the installed plugins take: "):
            engine.submit(GenerationRequest(**BASE, options={"strenght": {}}))
        text = engine.generate(GenerationRequest(**BASE, options={"strength": {"amount": 0.25}})).infotexts[0]
        assert parse_infotext(text).params["Strength amount"] == "0.25"


def test_register_model_families_claims_files(tmp_path, tiny_sd1_model):
    from sdcore.errors import UnknownModelFamily

    with Engine(device="cpu", load_entrypoints=False) as bare:
        with pytest.raises(UnknownModelFamily, match="families: none"):
            bare.load_model(str(tiny_sd1_model))


def test_register_commands_reaches_the_cli():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "sdcore.cli", "--help"], capture_output=True, text=True)
    assert "hello" in out.stdout  # added by the example plugin's register_commands
