"""The A1111 prompt language end to end: chunks, emphasis, BREAK, embeddings, scheduling, AND, tags, cache.

Numeric checks compare against hand computations on the raw text-encoder output of tiny models.
"""

import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
from sdcore_plugins.prompt_language import PromptLanguageOptions, count_tokens, parse
from sdcore_plugins.prompt_language.encoder import (
    EmbeddingSlot,
    PromptEncoder,
    encode_context,
    encode_parsed,
    model_state,
    parse_pair,
    sampler_step_multiplier,
    tokenize_line,
)
from sdcore_plugins.prompt_language.tags import UnknownTagWarning

from sdcore import Engine, GenerationRequest, hookimpl
from sdcore.errors import InvalidRequest, PluginError, PromptError
from sdcore.infotext import parse_infotext
from sdcore.metadata import request_from_infotext
from sdcore.models import TokenOverride
from sdcore.testing.models import build_tiny_model

CAT, DOG, A, RED, COMMA = 2368, 1929, 320, 736, 267
BASE = dict(width=64, height=64, sampler="Euler", seed=3, cfg_scale=7.0)


def tiny(family, variant=None):
    """A tiny model whose text encoders' layer norms have random biases: freshly initialised ones have zero
    biases, which makes the mean of the final layer's output 0 and A1111's mean restore ill-defined."""
    model = build_tiny_model(family, variant)
    generator = torch.Generator().manual_seed(1)
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(model, name, None)
        for module in encoder.modules() if encoder is not None else ():
            if isinstance(module, torch.nn.LayerNorm):
                module.bias.data = torch.randn(module.bias.shape, generator=generator) * 0.5 + 0.3
    return model


@pytest.fixture(scope="module")
def sd1():
    return tiny("sd1")


@pytest.fixture(scope="module")
def sdxl():
    return tiny("sdxl")


def encode(model, prompt, negative="", steps=20, **kwargs):
    positive, negative_parsed = parse_pair(prompt, negative, steps)
    conditioning, _ = encode_parsed(model, positive, negative_parsed, **kwargs)
    return conditioning


def embeds(model, prompt, **kwargs):
    return encode(model, prompt, **kwargs).positive[0].schedule[0][1]


def raw(model, chunks, clip_skip=1):
    return model.encode_token_chunks(chunks, clip_skip)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- chunks -----------------------------------------------------------------------------------------------


def test_200_tokens_give_3_chunks_encoded_separately(sd1):
    prompt = " ".join(["cat"] * 200)
    assert count_tokens(prompt) == [75, 75, 50]
    e = embeds(sd1, prompt)
    assert e.embeds.shape == (1, 3 * 77, 32) and e.pooled is None
    hidden, _ = raw(sd1, [[CAT] * 75, [CAT] * 75, [CAT] * 50])
    close(e.embeds[0], hidden.reshape(-1, 32))


def test_comma_backtrack_moves_text_after_a_comma_within_20_tokens():
    def chunks(prompt):
        return [c.tokens for c in tokenize_line([(prompt, 1.0)], lambda t: [{"cat": CAT, "dog": DOG, ",": COMMA}[w]
                                                                          for w in t.split()], COMMA)]

    near = chunks(" ".join(["cat"] * 70 + [","] + ["dog"] * 10))
    assert near == [(CAT,) * 70 + (COMMA,), (DOG,) * 10]
    far = chunks(" ".join(["cat"] * 50 + [","] + ["dog"] * 30))
    assert [len(c) for c in far] == [75, 6]
    # A1111 quirk: a comma that arrives when the chunk is full starts the next chunk, and is forgotten
    assert [len(c) for c in chunks(" ".join(["cat"] * 75 + [","] + ["dog"] * 3))] == [75, 4]
    assert count_tokens("cat " * 70 + ", " + "dog " * 10) == [71, 10]


def test_break_starts_a_new_chunk(sd1):
    e = embeds(sd1, "a cat BREAK a dog")
    assert e.embeds.shape[1] == 154
    hidden, _ = raw(sd1, [[A, CAT], [A, DOG]])
    close(e.embeds[0], hidden.reshape(-1, 32))
    assert count_tokens("BREAK a") == [0, 1]  # a fully padded first chunk
    assert count_tokens("a BREAK BREAK b") == [1, 0, 1]
    assert count_tokens("a BREAK") == [1]  # a trailing BREAK adds nothing
    assert count_tokens("a BREAK b", emphasis="None") == [3]  # no parsing: BREAK is a word


# --- emphasis ---------------------------------------------------------------------------------------------


def test_weight_changes_exactly_its_tokens_and_the_mean_is_restored(sd1):
    e = embeds(sd1, "a (red:1.5) cat").embeds[0]
    z = raw(sd1, [[A, RED, CAT]])[0][0]
    m = torch.ones(77, 1)
    m[2] = 1.5  # BOS, a, red, ...
    close(e, z * m * (z.mean() / (z * m).mean()))
    close(e.mean(), z.mean())
    ratio = e / z
    factor = ratio[0, 0]
    others = torch.cat([ratio[:2], ratio[3:]])
    close(others, torch.full_like(others, factor.item()))
    close(ratio[2], torch.full_like(ratio[2], 1.5 * factor.item()))


def test_emphasis_modes(sd1):
    z = raw(sd1, [[A, RED, CAT]])[0][0]
    m = torch.ones(77, 1)
    m[2] = 1.5
    close(embeds(sd1, "a (red:1.5) cat", emphasis="No norm").embeds[0], z * m)
    close(embeds(sd1, "a (red:1.5) cat", emphasis="Ignore").embeds[0], z)
    literal = sd1.tokenize("a (red:1.5) cat")
    close(embeds(sd1, "a (red:1.5) cat", emphasis="None").embeds[0], raw(sd1, [literal])[0][0])
    assert torch.equal(embeds(sd1, "a red cat").embeds[0], embeds(sd1, "a red cat", emphasis="No norm").embeds[0])


def test_mean_is_restored_over_the_schedule_batch_like_a1111(sd1):
    # A1111 encodes all texts of a sub-prompt's schedule as one batch and restores their joint mean
    schedule = encode(sd1, "[(cat:1.5):dog:0.5]", steps=4).positive[0].schedule
    first, second = schedule[0][1].embeds[0], schedule[1][1].embeds[0]
    z = raw(sd1, [[CAT], [DOG]])[0]
    m = torch.ones(2, 77, 1)
    m[0, 1] = 1.5
    expected = z * m * (z.mean() / (z * m).mean())
    close(first, expected[0])
    close(second, expected[1])


# --- models -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["sd15", "sd2"])
def test_sd1_and_sd2_long_prompts_and_clip_skip(variant):
    model = tiny("sd1", variant)
    prompt = "cat " * 80
    for skip in (1, 2):
        e = embeds(model, prompt, clip_skip=skip)
        hidden, _ = raw(model, [[CAT] * 75, [CAT] * 5], clip_skip=skip)
        close(e.embeds[0], hidden.reshape(-1, 32))
    assert not torch.equal(embeds(model, prompt, clip_skip=2).embeds, embeds(model, prompt).embeds)


def test_sdxl_concatenates_both_encoders_pools_from_chunk_0_and_restores_each_mean(sdxl):
    prompt = "(cat:1.3) " + "dog " * 99
    e = embeds(sdxl, prompt)
    hidden, pooled = raw(sdxl, [[CAT] + [DOG] * 74, [DOG] * 25])
    assert e.embeds.shape == (1, 154, 96) and e.pooled.shape == (1, 64)
    close(e.pooled[0], pooled[0])
    assert not torch.allclose(e.pooled[0], pooled[1])
    z = hidden[0]
    m = torch.ones(77, 1)
    m[1] = 1.3
    expected = []
    for part in (slice(0, 32), slice(32, 96)):  # clip_l, then clip_g, each restored on its own
        zp = z[:, part]
        expected.append(zp * m * (zp.mean() / (zp * m).mean()))
    close(e.embeds[0, :77], torch.cat(expected, dim=1))
    close(e.embeds[0, 77:], hidden[1])


def test_sdxl_empty_negative_prompt_is_zeros(sdxl, sd1):
    negative = encode(sdxl, "cat").negative.schedule[0][1]
    assert not negative.embeds.any() and not negative.pooled.any()
    assert encode(sdxl, "cat", negative="ugly").negative.schedule[0][1].embeds.any()
    assert encode(sd1, "cat").negative.schedule[0][1].embeds.any()


def test_textual_inversion_vectors_are_weighted_and_never_split(sd1):
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    state = model_state(sd1)
    state["embeddings"]["tinyemb"] = {"clip_l": vectors}
    try:
        encoder = PromptEncoder(sd1)
        slots = (EmbeddingSlot("tinyemb", 0), EmbeddingSlot("tinyemb", 1))
        assert encoder.chunks([("a tinyemb cat", 1.0)])[0].tokens == (A, *slots, CAT)
        assert encoder.chunks([("a (tiny)emb", 1.0)])[0].tokens != (A, *slots)  # split by brackets: plain words
        long = encoder.chunks([("cat " * 74 + "tinyemb", 1.0)])
        assert [c.tokens for c in long] == [(CAT,) * 74, slots]
        assert count_tokens("a tinyemb cat", sd1) == [4] and count_tokens("a tinyemb cat") == [5]
        overrides = [TokenOverride({"clip_l": vectors[0]}), TokenOverride({"clip_l": vectors[1]})]
        z = raw(sd1, [[A, *overrides, CAT]])[0][0]
        m = torch.ones(77, 1)
        m[2:4] = 1.2
        positive, negative = parse_pair("a (tinyemb:1.2) cat", "", 20)
        conditioning, facts = encode_parsed(sd1, positive, negative)
        close(conditioning.positive[0].schedule[0][1].embeds[0], z * m * (z.mean() / (z * m).mean()))
        assert facts["used_embeddings"] == ["tinyemb"]
    finally:
        del state["embeddings"]["tinyemb"]


def test_cache_encodes_each_distinct_chunk_once_and_is_keyed(sd1):
    calls = []
    original = sd1.encode_token_chunks

    def counting(chunks, clip_skip=1):
        calls.append(len(chunks))
        return original(chunks, clip_skip)

    sd1.encode_token_chunks = counting
    try:
        prompt = "[pear|plum|kiwi], fruit bowl, " + "still life " * 40
        encode(sd1, prompt, negative="blurry", steps=10)
        assert calls == [4, 1]  # pear/plum/kiwi chunks + the shared second chunk; the negative
        calls.clear()
        encode(sd1, prompt, negative="blurry", steps=10)
        assert calls == []  # cached across jobs
        encode(sd1, prompt, negative="blurry", steps=10, emphasis="No norm")
        assert calls == []  # emphasis is applied to cached chunk encodings
        encode(sd1, prompt, negative="blurry", steps=10, clip_skip=2)
        assert calls == [4, 1]
        calls.clear()
        state = model_state(sd1)
        state["text_encoder_revision"] = ("lora", "x", 0.5)  # what a text-encoder LoRA plugin does
        encode(sd1, prompt, negative="blurry", steps=10)
        assert calls == [4, 1]
        calls.clear()
        state["text_encoder_revision"] = 0  # patch removed: the old encodings are valid again
        encode(sd1, prompt, negative="blurry", steps=10)
        assert calls == []
    finally:
        del sd1.encode_token_chunks


def test_and_pads_shorter_subprompts_with_their_last_vector(sd1):
    conditioning = encode(sd1, "cat AND " + "dog " * 80)
    short, long = (text.schedule[0][1].embeds for text in conditioning.positive)
    assert short.shape == long.shape == (1, 154, 32)
    cat = embeds(sd1, "cat").embeds
    close(short[:, :77], cat)
    close(short[:, 77:], cat[:, -1:].expand(1, 77, 32))
    assert conditioning.negative.schedule[0][1].embeds.shape[1] == 77  # not padded: A1111's default


def test_pad_conds_options(sd1):
    positive, negative = parse_pair("dog " * 80, "", 20)
    conditioning, facts = encode_parsed(sd1, positive, negative, pad_conds=True)
    uncond = conditioning.negative.schedule[0][1].embeds
    assert uncond.shape[1] == 154 and facts["padded"]
    close(uncond[:, 77:], embeds(sd1, "").embeds)
    conditioning, facts = encode_parsed(sd1, positive, negative, pad_conds_v0=True)
    uncond = conditioning.negative.schedule[0][1].embeds
    assert facts["padded_v0"] and uncond.shape[1] == 154
    close(uncond[:, 77:], uncond[:, 76:77].expand(1, 77, 32))


# --- through the engine -----------------------------------------------------------------------------------


class Recorder:
    def __init__(self):
        self.steps = []
        self.noise = []

    @hookimpl
    def before_denoise_step(self, state):
        self.steps.append((state.step, state.conditioning, state.latents.clone(), state.timestep))

    @hookimpl
    def after_denoise_step(self, state):
        self.noise.append(state.noise_pred.clone())


@pytest.fixture(scope="module")
def engine(tiny_sd1_model):
    recorder = Recorder()
    with Engine(device="cpu", default_model=tiny_sd1_model, plugins=[recorder]) as engine:
        engine.recorder = recorder
        yield engine


def run(engine, prompt, **changes):
    engine.recorder.steps.clear()
    engine.recorder.noise.clear()
    return engine.generate(GenerationRequest(prompt=prompt, **{**BASE, **changes}))


def texts_per_step(engine, *candidates):
    model = engine.load_model()
    known = {text: embeds(model, text).embeds for text in candidates}
    out = []
    for _, conditioning, _, _ in engine.recorder.steps:
        current = conditioning.positive[0][0].embeds
        out.append(next(t for t, e in known.items() if torch.allclose(current, e, atol=1e-6)))
    return out


def test_prompt_editing_switches_at_a1111s_step(engine):
    run(engine, "[cat:dog:0.5]", steps=20)
    assert texts_per_step(engine, "cat", "dog") == ["cat"] * 11 + ["dog"] * 9  # indices 0..10 use "cat"


def test_alternation_per_model_call_and_second_order_samplers(engine):
    run(engine, "[cat|dog]", steps=4)
    assert texts_per_step(engine, "cat", "dog") == ["cat", "cat", "dog", "cat"]
    # Heun: A1111 schedules over 2 × 3 steps and switches per model call (5 calls)
    run(engine, "[cat|dog]", steps=3, sampler="Heun")
    assert texts_per_step(engine, "cat", "dog") == ["cat", "cat", "dog", "cat", "dog"]
    assert sampler_step_multiplier(engine, GenerationRequest(sampler="Heun")) == 2
    assert sampler_step_multiplier(engine, GenerationRequest(sampler="DPM++ 2M")) == 1


def test_and_is_composable_diffusion_in_the_guidance(engine):
    run(engine, "cat AND dog:0.5", steps=2, sampler="DDIM")  # DDIM: the UNet input is the latents as they are
    _, conditioning, latents, t = engine.recorder.steps[0]
    (cat, w1), (dog, w2) = conditioning.positive
    assert (w1, w2) == (1.0, 0.5)
    unet = engine.load_model().unet

    def eps(embedding):
        with torch.no_grad():
            return unet(latents, t, encoder_hidden_states=embedding.embeds).sample

    u = eps(conditioning.negative)
    expected = u + 7.0 * 1.0 * (eps(cat) - u) + 7.0 * 0.5 * (eps(dog) - u)
    torch.testing.assert_close(engine.recorder.noise[0], expected, rtol=1e-4, atol=1e-4)
    without_and = u + 7.0 * (eps(cat) - u)
    assert (engine.recorder.noise[0] - without_and).abs().max() > 100 * 1e-4


def test_bad_prompt_is_refused_at_submit_with_its_position(engine):
    with pytest.raises(PromptError, match="position 3") as info:
        engine.submit(GenerationRequest(prompt="(a:1..2) cat", **BASE))
    assert info.value.position == 3
    with pytest.raises(PromptError, match="BREAK"):
        engine.submit(GenerationRequest(prompt="(a BREAK b)", **BASE))
    with pytest.raises(PromptError):
        engine.submit(GenerationRequest(prompt="cat", negative_prompt="<lora:x:1>", **BASE))
    assert engine.queued_jobs() == []
    lenient = {"prompt_language": {"strict": False}}
    assert engine.submit(GenerationRequest(prompt="(a BREAK b)", options=lenient, **{**BASE, "steps": 1})).result()


def test_infotext_keeps_the_prompt_as_written_and_records_emphasis(engine):
    prompt = "a [cat:dog:0.5], (red:1.2)\nsecond line AND sky:0.5"
    options = {"prompt_language": {"emphasis": "No norm"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownTagWarning)
        result = run(engine, prompt, steps=2, negative_prompt="[ugly]", options=options)
    info = parse_infotext(result.infotexts[0])
    assert info.prompt == prompt and info.negative_prompt == "[ugly]"
    assert info.params["Emphasis"] == "No norm"
    again = request_from_infotext(result.infotexts[0], engine=engine)
    assert again.options["prompt_language"].emphasis == "No norm" and again.prompt == prompt
    plain = parse_infotext(run(engine, "(red)", steps=1).infotexts[0])
    assert "Emphasis" not in plain.params
    assert PromptLanguageOptions.from_infotext({"Pad conds": "True"}).pad_conds


def test_hires_pass_schedule(engine):
    model = engine.load_model()
    request = GenerationRequest(prompt="[a:b:25]", steps=10, **BASE)
    context = SimpleNamespace(request=request, model=model, engine=engine, extra={"hires_first_pass_steps": 20})
    conditioning = encode_context(context, PromptLanguageOptions())
    assert [until for until, _ in conditioning.positive[0].schedule] == [5, 10]
    assert context.extra["prompt_language"]["schedule_steps"] == 10


@pytest.mark.parametrize("kind", ["sd2", "sdxl"])
def test_sd2_and_sdxl_end_to_end(kind, tiny_sdxl_model, sdcore_model_dir):
    from sdcore.testing.models import make_tiny_model

    path = tiny_sdxl_model if kind == "sdxl" else make_tiny_model(sdcore_model_dir, family="sd1", variant="sd2")
    recorder = Recorder()
    prompt = "[cat|dog], (red:1.3) " + "house " * 80 + "BREAK sky AND tree:0.5"
    with Engine(device="cpu", default_model=path, plugins=[recorder]) as engine:
        result = engine.generate(GenerationRequest(prompt=prompt, steps=2, clip_skip=2, **BASE))
        model = engine.load_model()
    assert parse_infotext(result.infotexts[0]).prompt == prompt
    conditioning = recorder.steps[0][1]
    (first, w1), (second, w2) = conditioning.positive
    assert (w1, w2) == (1.0, 0.5) and first.embeds.shape[1] == second.embeds.shape[1] == 3 * 77
    close(first.embeds, encode(model, prompt, steps=2, clip_skip=2).positive[0].schedule[0][1].embeds)
    if kind == "sdxl":
        hidden, pooled = raw(model, [[CAT, COMMA, RED] + [model.tokenize("house")[0]] * 72])
        close(first.pooled[0], pooled[0])  # the first chunk's pooled output
        assert not conditioning.negative.embeds.any()  # empty negative prompt: zeros, as A1111
    else:
        assert first.pooled is None


# --- extra-network tags -----------------------------------------------------------------------------------


class FooTags:
    def __init__(self):
        self.calls = []

    @hookimpl
    def register_prompt_tags(self, register):
        register("foo", self.handle, check=self.check)

    def handle(self, args_list, context):
        self.calls.append(args_list)
        context.extra["foo"] = args_list

    def check(self, args_list, request, engine):
        if any(args[0] == "missing" for args in args_list):
            raise InvalidRequest("no foo called 'missing'")

    @hookimpl(wrapper=True)
    def run_generation(self, context):
        self.seen_before_wrapper = context.extra.get("foo")
        return (yield)


def test_tags_reach_their_handler_before_other_wrappers(tiny_sd1_model):
    foo = FooTags()
    with Engine(device="cpu", default_model=tiny_sd1_model, plugins=[foo]) as engine:
        with pytest.warns(UnknownTagWarning, match=r"<bar:\.\.\.>.*<foo:\.\.\.>"):
            result = engine.generate(GenerationRequest(prompt="a <foo:1:x=2>, cat <bar:z> <foo:b>", steps=1, **BASE))
        assert foo.calls == [[["1", "x=2"], ["b"]]]
        assert foo.seen_before_wrapper == [["1", "x=2"], ["b"]]
        assert parse_infotext(result.infotexts[0]).prompt == "a <foo:1:x=2>, cat <bar:z> <foo:b>"
        with pytest.raises(InvalidRequest, match="missing"):
            engine.submit(GenerationRequest(prompt="<foo:missing>", **BASE))

        class Twice:
            @hookimpl
            def register_prompt_tags(self, register):
                register("foo", lambda args, context: None)

        engine.register(Twice())
        with pytest.raises(PluginError, match="registered twice"):
            engine.submit(GenerationRequest(prompt="cat", **BASE))


def test_parse_function_and_module_import_is_light():
    parsed = parse("a <lora:x:0.8> [cat:dog:0.5] AND b:0.5", steps=20)
    assert parsed["extra_networks"] == {"lora": [["x", "0.8"]]}
    assert [s["until"] for s in parsed["subprompts"][0]["schedule"]] == [10, 20]
    assert parse("a AND b", negative=True)["subprompts"][0]["text"] == "a AND b"
    code = "import sys, sdcore_plugins.prompt_language; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
