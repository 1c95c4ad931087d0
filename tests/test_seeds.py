"""A1111 seeds in CPU mode: per-image generators, variation seeds, seed resize, step-noise streams."""

from __future__ import annotations

import pytest
import torch

from sdcore.errors import InvalidRequest
from sdcore.seeds import (
    MAX_SEED,
    create_generators,
    create_noise,
    image_seeds,
    next_noise,
    resolve_seed,
    slerp,
)

SHAPE = (4, 8, 8)


def randn(seed: int, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_noise_is_torch_cpu_randn_of_the_seed_exactly() -> None:
    noise, _ = create_noise(SHAPE, [42])
    assert noise.shape == (1, *SHAPE)
    assert noise.dtype == torch.float32 and noise.device.type == "cpu"
    # Pinned values: a change of RNG (device, dtype, algorithm) must fail here.
    expected = [1.9269152879714966, 1.4872840642929077, 0.9007171988487244, -2.1055209636688232]
    assert noise.flatten()[:4].tolist() == expected
    assert torch.equal(noise[0], randn(42))


def test_same_seed_gives_bit_identical_noise() -> None:
    a, _ = create_noise(SHAPE, [1234, 99])
    b, _ = create_noise(SHAPE, [1234, 99])
    assert torch.equal(a, b)
    c, _ = create_noise(SHAPE, [1235, 99])
    assert not torch.equal(a[0], c[0])


def test_image_i_of_a_batch_equals_a_batch_of_one_with_seed_plus_i() -> None:
    seeds, _ = image_seeds(1000, None, 4)
    assert seeds == [1000, 1001, 1002, 1003]
    batch, _ = create_noise(SHAPE, seeds)
    for i in range(4):
        single, _ = create_noise(SHAPE, [1000 + i])
        assert torch.equal(batch[i], single[0])


def test_image_seeds_of_a_later_batch_continue_counting() -> None:
    # batch 2 (0-based) of size 3: images 6, 7, 8 of the job
    assert image_seeds(10, 500, 3, 6) == ([16, 17, 18], [506, 507, 508])


def test_variation_keeps_the_seed_and_counts_up_only_subseeds_like_a1111() -> None:
    seeds, subseeds = image_seeds(10, 500, 3, subseed_strength=0.3)
    assert seeds == [10, 10, 10]
    assert subseeds == [500, 501, 502]


def test_variation_strength_without_subseed_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="without a variation seed"):
        image_seeds(10, None, 2, subseed_strength=0.5)


def test_subseed_strength_zero_is_plain_seed_noise() -> None:
    noise, _ = create_noise(SHAPE, [7], [8], 0.0)
    assert torch.equal(noise[0], randn(7))


def test_subseed_strength_one_is_subseed_noise() -> None:
    noise, _ = create_noise(SHAPE, [7], [8], 1.0)
    torch.testing.assert_close(noise[0], randn(8), rtol=0, atol=1e-5)


def test_subseed_blend_is_a1111_slerp_and_strength_out_of_range_is_refused() -> None:
    noise, _ = create_noise(SHAPE, [7], [8], 0.25)
    assert torch.equal(noise[0], slerp(0.25, randn(7), randn(8)))
    assert not torch.allclose(noise[0], randn(7)) and not torch.allclose(noise[0], randn(8))
    with pytest.raises(InvalidRequest, match="from 0 to 1"):
        create_noise(SHAPE, [7], [8], 1.5)


def test_missing_subseed_entry_counts_as_subseed_zero() -> None:
    noise, _ = create_noise(SHAPE, [7, 9], [8], 1.0)
    torch.testing.assert_close(noise[1], randn(0), rtol=0, atol=1e-5)


def test_slerp_keeps_unit_norms_along_dim_1() -> None:
    low = randn(1, (4, 16, 5))
    high = randn(2, (4, 16, 5))
    low = low / low.norm(dim=1, keepdim=True)
    high = high / high.norm(dim=1, keepdim=True)
    for val in (0.0, 0.3, 0.5, 1.0):
        out = slerp(val, low, high)
        torch.testing.assert_close(out.norm(dim=1), torch.ones(4, 5), rtol=0, atol=1e-5)
    torch.testing.assert_close(slerp(0.0, low, high), low, rtol=0, atol=1e-6)
    torch.testing.assert_close(slerp(1.0, low, high), high, rtol=0, atol=1e-5)


def test_slerp_parallel_fallback_has_a1111s_swapped_weights() -> None:
    low = randn(3)
    high = 2 * low  # parallel: cosine 1 > 0.9995
    out = slerp(0.25, low, high)
    # A1111 returns low*val + high*(1-val) = 0.25*low + 1.5*low, not the usual 0.75*low + 0.5*low
    torch.testing.assert_close(out, 1.75 * low, rtol=0, atol=1e-6)


def test_generators_continue_after_the_initial_draw() -> None:
    noise, gens = create_noise(SHAPE, [5, 6])
    step = next_noise(gens, SHAPE)
    for i, seed in enumerate([5, 6]):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(noise[i], torch.randn(SHAPE, generator=g))
        assert torch.equal(step[i], torch.randn(SHAPE, generator=g))


def test_generators_draw_what_diffusers_randn_tensor_draws_per_image() -> None:
    from diffusers.utils.torch_utils import randn_tensor

    _, gens = create_noise(SHAPE, [5, 6])
    _, gens_copy = create_noise(SHAPE, [5, 6])
    ours = next_noise(gens, SHAPE)
    theirs = randn_tensor((2, *SHAPE), generator=gens_copy, dtype=torch.float32)
    assert torch.equal(ours, theirs)


def test_ensd_reseeds_generators_with_seed_plus_delta() -> None:
    noise, gens = create_noise(SHAPE, [5], eta_noise_seed_delta=31337)
    assert torch.equal(noise[0], randn(5))
    assert torch.equal(next_noise(gens, SHAPE)[0], randn(5 + 31337))


def test_seed_resize_pastes_old_size_noise_centred() -> None:
    # Target latent 4x8x8 (64x64 px); resize from 32x48 px (w x h) -> noise drawn at 4x6x4.
    noise, gens = create_noise(SHAPE, [11], seed_resize_from=(32, 48))
    small = randn(11, (4, 6, 4))
    g = torch.Generator().manual_seed(11)
    canvas = torch.randn(SHAPE, generator=g)
    # dx = (8 - 4) // 2 = 2, dy = (8 - 6) // 2 = 1
    assert torch.equal(noise[0, :, 1:7, 2:6], small)
    assert torch.equal(noise[0, :, 0, :], canvas[:, 0, :])
    assert torch.equal(noise[0, :, :, 0:2], canvas[:, :, 0:2])
    # the image's generator made exactly one full-size draw, so step noise is unaffected by the option
    assert torch.equal(next_noise(gens, SHAPE)[0], torch.randn(SHAPE, generator=g))


def test_seed_resize_from_larger_size_crops_the_centre() -> None:
    noise, _ = create_noise(SHAPE, [11], seed_resize_from=(96, 80))  # latent 4x10x12
    big = randn(11, (4, 10, 12))
    assert torch.equal(noise[0], big[:, 1:9, 2:10])


def test_seed_resize_off_when_a_side_is_zero() -> None:
    noise, _ = create_noise(SHAPE, [11], seed_resize_from=(0, 64))
    assert torch.equal(noise[0], randn(11))


def test_resolve_random_seed_is_in_range_and_recorded() -> None:
    values = {resolve_seed(-1) for _ in range(20)}
    assert all(0 <= v <= MAX_SEED for v in values)
    assert len(values) > 1
    seed = resolve_seed(-1)
    assert resolve_seed(seed) == seed  # the recorded value is a valid seed that reproduces itself


@pytest.mark.parametrize("bad", [-2, MAX_SEED + 1, 2**40])
def test_bad_seeds_are_refused_with_the_range(bad: int) -> None:
    with pytest.raises(InvalidRequest) as info:
        resolve_seed(bad)
    assert f"from 0 to {MAX_SEED}" in str(info.value)
    assert str(bad) in str(info.value)


def test_non_integer_seed_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="integer"):
        resolve_seed(1.5)  # type: ignore[arg-type]


def test_limits_are_accepted() -> None:
    assert resolve_seed(0) == 0
    assert resolve_seed(MAX_SEED) == MAX_SEED


def test_create_generators_are_cpu_and_seeded() -> None:
    (g,) = create_generators([123])
    assert g.device.type == "cpu" and g.initial_seed() == 123


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(InvalidRequest, match="channels, height, width"):
        create_noise((4, 8), [1])  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="at least one seed"):
        create_noise(SHAPE, [])
