"""A1111 sampler / schedule-type names mapped to diffusers schedulers, built from real model configs."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sdcore.errors import InvalidRequest, PluginError, UnknownSampler
from sdcore.samplers import (
    BUILTIN_SAMPLERS,
    SCHEDULE_TYPES,
    Sampler,
    SamplerRegistry,
    describe,
    schedule_kwargs,
)

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
SD15_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
SDXL_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

EXPECTED_CLASSES = {
    "Euler a": "EulerAncestralDiscreteScheduler",
    "Euler": "EulerDiscreteScheduler",
    "LMS": "LMSDiscreteScheduler",
    "Heun": "HeunDiscreteScheduler",
    "DPM2": "KDPM2DiscreteScheduler",
    "DPM2 a": "KDPM2AncestralDiscreteScheduler",
    "DPM++ 2M": "DPMSolverMultistepScheduler",
    "DPM++ SDE": "DPMSolverSDEScheduler",
    "DPM++ 2M SDE": "DPMSolverMultistepScheduler",
    "DDIM": "DDIMScheduler",
    "PLMS": "PNDMScheduler",
    "UniPC": "UniPCMultistepScheduler",
    "LCM": "LCMScheduler",
}


@pytest.fixture(scope="module")
def registry() -> SamplerRegistry:
    return SamplerRegistry.with_builtins()


def test_builtin_samplers_include_the_a1111_set(registry: SamplerRegistry) -> None:
    for name, cls in EXPECTED_CLASSES.items():
        assert registry.get(name).scheduler_class == cls
    assert SCHEDULE_TYPES == ("Automatic", "Karras", "Exponential", "SGM Uniform")


COMBOS = [(s.name, t) for s in BUILTIN_SAMPLERS for t in s.schedule_types]


def test_every_sampler_and_claimed_schedule_builds_from_sd15_config_and_sets_timesteps(
    registry: SamplerRegistry,
) -> None:
    for name, schedule in COMBOS:
        scheduler = registry.make_scheduler(name, schedule, SD15_CONFIG)
        sampler = registry.get(name)
        assert type(scheduler).__name__ == sampler.scheduler_class, (name, schedule)
        config = scheduler.config
        assert (config.beta_start, config.beta_end, config.beta_schedule) == (0.00085, 0.012, "scaled_linear")
        assert config.num_train_timesteps == 1000 and config.steps_offset == 1
        scheduler.set_timesteps(20)
        assert len(scheduler.timesteps) >= 20, (name, schedule)
        effective = sampler.effective_schedule(schedule)
        if effective == "Karras":
            assert config.use_karras_sigmas is True, (name, schedule)
        if effective == "Exponential":
            assert config.use_exponential_sigmas is True, (name, schedule)
        if effective == "SGM Uniform":
            assert config.timestep_spacing == "trailing", (name, schedule)


def test_dpmpp_2m_karras(registry: SamplerRegistry) -> None:
    scheduler = registry.make_scheduler("DPM++ 2M", "Karras", SD15_CONFIG)
    assert type(scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert scheduler.config.use_karras_sigmas is True
    assert scheduler.config.algorithm_type == "dpmsolver++" and scheduler.config.solver_order == 2


def test_karras_spans_the_full_sigma_range_even_on_leading_configs(registry: SamplerRegistry) -> None:
    scheduler = registry.make_scheduler("DPM++ 2M", "Karras", SDXL_CONFIG)
    scheduler.set_timesteps(20)
    # sigma at t=999 of SD's scaled-linear schedule, as A1111's Karras uses; "leading" would start at 11.03
    assert scheduler.sigmas[0].item() == pytest.approx(14.6146, abs=1e-3)
    assert scheduler.sigmas[-2].item() == pytest.approx(0.0292, abs=1e-3)


def test_automatic_means_the_samplers_a1111_default(registry: SamplerRegistry) -> None:
    assert registry.make_scheduler("DPM++ 2M", "Automatic", SD15_CONFIG).config.use_karras_sigmas is True
    assert (
        registry.make_scheduler("DPM++ 2M SDE", "Automatic", SD15_CONFIG).config.use_exponential_sigmas
        is True
    )
    euler = registry.make_scheduler("Euler", "Automatic", SDXL_CONFIG)
    assert euler.config.use_karras_sigmas is False and euler.config.timestep_spacing == "leading"


def test_sgm_uniform_turns_off_a_karras_flag_from_the_model_config(registry: SamplerRegistry) -> None:
    config = {**SDXL_CONFIG, "use_karras_sigmas": True}
    scheduler = registry.make_scheduler("Euler", "SGM Uniform", config)
    assert scheduler.config.use_karras_sigmas is False and scheduler.config.timestep_spacing == "trailing"


def test_v_prediction_and_zero_snr_are_kept_from_the_base_config(registry: SamplerRegistry) -> None:
    config = {**SD15_CONFIG, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
    for name in ("Euler a", "DPM++ 2M", "DDIM", "UniPC"):
        scheduler = registry.make_scheduler(name, "Automatic", config)
        assert scheduler.config.prediction_type == "v_prediction", name
        assert scheduler.config.rescale_betas_zero_snr is True, name


def test_scheduler_from_a_live_scheduler_config(registry: SamplerRegistry) -> None:
    from diffusers import PNDMScheduler

    live = PNDMScheduler.from_config(SD15_CONFIG)
    scheduler = registry.make_scheduler("Euler a", "Automatic", live.config)
    assert type(scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    # PNDM's default "leading" is not the model's setting, so it does not carry over (diffusers' rule)
    assert scheduler.config.timestep_spacing == "linspace"


def test_lookup_is_case_insensitive_and_reports_the_canonical_name(registry: SamplerRegistry) -> None:
    assert registry.get("euler a").name == "Euler a"
    assert registry.get("EULER A").name == "Euler a"
    assert registry.get("Euler  A").name == "Euler a"
    assert registry.get("k_euler_ancestral").name == "Euler a"
    assert registry.get("dpm++ 2m").name == "DPM++ 2M"


@pytest.mark.parametrize(
    ("name", "schedule", "expected"),
    [
        ("DPM++ 2M Karras", "Automatic", ("DPM++ 2M", "Karras")),
        ("DPM++ 2M Karras", None, ("DPM++ 2M", "Karras")),
        ("dpm++ 2m sde exponential", "", ("DPM++ 2M SDE", "Exponential")),
        ("Euler a", "sgm_uniform", ("Euler a", "SGM Uniform")),
        ("LMS Karras", "karras", ("LMS", "Karras")),
        ("DPM2 a Karras", "Automatic", ("DPM2 a", "Karras")),
        ("Euler", "Automatic", ("Euler", "Automatic")),
        ("k_dpmpp_2m", "Karras", ("DPM++ 2M", "Karras")),
    ],
)
def test_resolve_legacy_and_modern_names(
    registry: SamplerRegistry, name: str, schedule: str | None, expected: tuple[str, str]
) -> None:
    sampler, label = registry.resolve(name, schedule)
    assert (sampler.name, label) == expected


def test_combined_name_with_contradicting_schedule_is_refused(registry: SamplerRegistry) -> None:
    with pytest.raises(InvalidRequest, match="contradicts"):
        registry.resolve("DPM++ 2M Karras", "Exponential")


def test_unknown_sampler_lists_every_known_name(registry: SamplerRegistry) -> None:
    with pytest.raises(UnknownSampler) as info:
        registry.get("Euler b")
    message = str(info.value)
    assert "'Euler b'" in message
    for name in registry.names():
        assert name in message
    with pytest.raises(UnknownSampler):
        registry.resolve("Totally Unknown Karras", "Automatic")


def test_a1111_sampler_without_diffusers_equivalent_says_so(registry: SamplerRegistry) -> None:
    with pytest.raises(UnknownSampler, match="'DPM fast' is an A1111 sampler that sdcore cannot run"):
        registry.get("dpm fast")
    with pytest.raises(UnknownSampler, match="DPM\\+\\+ 2S a"):
        registry.make_scheduler("DPM++ 2S a", "Karras", SD15_CONFIG)


def test_unsupported_combination_is_refused_by_name(registry: SamplerRegistry) -> None:
    with pytest.raises(InvalidRequest) as info:
        registry.resolve("DDIM", "Karras")
    assert (
        str(info.value)
        == "sampler 'DDIM' cannot use schedule type 'Karras'; it supports: Automatic, SGM Uniform"
    )
    with pytest.raises(InvalidRequest, match="'Euler a' cannot use schedule type 'Exponential'"):
        registry.make_scheduler("Euler a", "Exponential", SD15_CONFIG)


def test_unknown_or_unsupported_schedule_type(registry: SamplerRegistry) -> None:
    with pytest.raises(InvalidRequest, match="'Align Your Steps' is an A1111 schedule type diffusers has no"):
        registry.resolve("Euler", "Align Your Steps")
    with pytest.raises(InvalidRequest, match="'Karas' is unknown; known schedule types: Automatic, Karras"):
        registry.resolve("Euler", "Karas")


def test_register_rejects_duplicate_names_and_aliases() -> None:
    reg = SamplerRegistry.with_builtins()
    with pytest.raises(PluginError, match="'euler' is already taken by sampler 'Euler'"):
        reg.register(Sampler("euler", "EulerDiscreteScheduler", {}, ("Automatic",)))
    with pytest.raises(PluginError, match="'K_EULER_A' is already taken by sampler 'Euler a'"):
        reg.register(Sampler("Mine", "EulerDiscreteScheduler", {}, ("Automatic",), aliases=("K_EULER_A",)))
    reg.register(Sampler("DEIS", "DEISMultistepScheduler", {}, ("Automatic", "Karras")))
    assert reg.names()[-1] == "DEIS"
    assert type(reg.make_scheduler("deis", "Karras", SD15_CONFIG)).__name__ == "DEISMultistepScheduler"


def test_sampler_definition_is_checked() -> None:
    with pytest.raises(PluginError, match="schedule type 'Beta'"):
        Sampler("X", "EulerDiscreteScheduler", {}, ("Automatic", "Beta"))
    with pytest.raises(PluginError, match="must support the 'Automatic'"):
        Sampler("X", "EulerDiscreteScheduler", {}, ("Karras",))


def test_missing_optional_package_names_the_pip_package(
    registry: SamplerRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec

    def fake_find_spec(name: str, *args: object) -> object:
        return None if name in ("scipy", "torchsde") else real(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(InvalidRequest, match="pip install scipy"):
        registry.make_scheduler("LMS", "Automatic", SD15_CONFIG)
    with pytest.raises(InvalidRequest, match="pip install torchsde"):
        registry.make_scheduler("DPM++ SDE", "Karras", SD15_CONFIG)


def test_dpmpp_sde_noise_seeds_are_per_image(registry: SamplerRegistry) -> None:
    scheduler = registry.make_scheduler("DPM++ SDE", "Karras", SD15_CONFIG, noise_seeds=[7, 8])
    assert scheduler.config.noise_sampler_seed == [7, 8]
    euler = registry.make_scheduler("Euler", "Automatic", SD15_CONFIG, noise_seeds=[7, 8])
    assert "noise_sampler_seed" not in euler.config


def test_ancestral_step_accepts_per_image_generators(registry: SamplerRegistry) -> None:
    scheduler = registry.make_scheduler("Euler a", "Automatic", SD15_CONFIG)
    scheduler.set_timesteps(4)
    latents = torch.zeros(2, 4, 8, 8)
    out = torch.zeros(2, 4, 8, 8)
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    t = scheduler.timesteps[0]
    prev = scheduler.step(out, t, latents, generator=gens).prev_sample
    sigma_up = (prev[0] / torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(1))).flatten()[0]
    expected = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(2)) * sigma_up
    torch.testing.assert_close(prev[1], expected, rtol=1e-5, atol=1e-6)


def test_describe_lists_every_sampler() -> None:
    rows = describe()
    assert [r["name"] for r in rows] == [s.name for s in BUILTIN_SAMPLERS]
    euler_a = rows[0]
    assert euler_a == {
        "name": "Euler a",
        "aliases": ["k_euler_a", "k_euler_ancestral"],
        "schedule_types": ["Automatic", "SGM Uniform"],
        "default_schedule": "Automatic",
        "scheduler_class": "EulerAncestralDiscreteScheduler",
        "scheduler_kwargs": {},
        "requires": [],
    }


def test_schedule_kwargs() -> None:
    assert schedule_kwargs("Automatic") == {}
    assert schedule_kwargs("Karras") == {
        "use_karras_sigmas": True,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "timestep_spacing": "linspace",
    }
    assert schedule_kwargs("SGM Uniform")["timestep_spacing"] == "trailing"


@pytest.mark.filterwarnings("ignore:Should have ta>=t0")
@pytest.mark.parametrize("name", ["Euler a", "DPM++ 2M SDE", "DPM++ SDE", "LCM"])
def test_stochastic_samplers_keep_batch_images_independent(registry: SamplerRegistry, name: str) -> None:
    """Image i of a batch equals a batch of one with its seed, through every noisy step, when the engine
    passes the per-image generators from `create_noise` to `step` (if it takes them; DPM++ SDE does not)
    and the image seeds as `noise_seeds`."""
    import inspect

    from sdcore.seeds import create_noise, image_seeds

    def run(seeds: list[int]) -> torch.Tensor:
        scheduler = registry.make_scheduler(name, "Automatic", SD15_CONFIG, noise_seeds=seeds)
        scheduler.set_timesteps(5)
        noise, generators = create_noise((4, 8, 8), seeds)
        kwargs = (
            {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
        )
        x = noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_output = 0.3 * torch.tanh(scheduler.scale_model_input(x, t))  # a stand-in denoiser
            x = scheduler.step(model_output, t, x, **kwargs).prev_sample
        return x

    seeds, _ = image_seeds(100, None, 3)
    assert torch.equal(run(seeds)[2], run([102])[0])
