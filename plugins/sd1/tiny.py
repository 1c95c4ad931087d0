"""Tiny random-weight SD 1.x / 2.x models for tests: the real block layouts (4 UNet levels, 2 layers each,
8x VAE), tiny widths, the real 49 408-token vocabulary. They build in a fraction of a second on a CPU."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from sdcore_plugins import sdcommon

from sdcore.checkpoints import ModelSource
from sdcore.errors import InvalidRequest
from sdcore.models import LoadOptions
from sdcore.tokenizers import clip_tokenizer

if TYPE_CHECKING:
    from .family import SD1Family
    from .model import SD1Model

TINY_UNET = {
    "block_out_channels": [8, 16, 16, 16],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
    "sample_size": 8,
}
TINY_UNET_SD2 = {**TINY_UNET, "attention_head_dim": [2, 4, 4, 4]}  # use_linear_projection etc. from the real config
TINY_VAE = {"block_out_channels": [8, 8, 16, 16], "norm_num_groups": 8, "sample_size": 64}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 3, "num_attention_heads": 2,
             "projection_dim": 32}


def tiny_configs(family: SD1Family, variant: str) -> dict[str, dict[str, Any]]:
    """The shipped real configs of `variant` with tiny widths (same block types, layers, activations)."""
    folder = family.config_folder(variant)
    sd2 = variant.startswith("sd2")
    unet = {**sdcommon.read_component_config(folder, "unet"), **(TINY_UNET_SD2 if sd2 else TINY_UNET)}
    vae = {**sdcommon.read_component_config(folder, "vae"), **TINY_VAE}
    text = {**sdcommon.read_component_config(folder, "text_encoder"), **TINY_TEXT}
    scheduler = sdcommon.read_component_config(folder, "scheduler")
    return {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": scheduler}


def build_tiny(family: SD1Family, variant: str, seed: int = 0, dtype: str | torch.dtype = "float32") -> SD1Model:
    from .model import SD1Model

    if variant not in family.variants:
        raise InvalidRequest(f"unknown sd1 variant {variant!r}; known: {', '.join(family.variants)}")
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else sdcommon.torch_dtype(dtype)
    configs = tiny_configs(family, variant)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules = {
            "unet": sdcommon.unet_factory(configs["unet"])(),
            "vae": sdcommon.vae_factory(configs["vae"])(),
            "text_encoder": sdcommon.text_encoder_factory(configs["text_encoder"])(),
        }
    for module in modules.values():
        torch.nn.Module.to(module, torch_dtype)  # the plain cast (diffusers' .to() warns about fp32 modules)
        module.eval().requires_grad_(False)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    source = ModelSource(location=f"tiny-{variant}", kind="diffusers")
    tokenizer = clip_tokenizer(family.pad_token(variant))
    return SD1Model(source, LoadOptions(dtype=dtype_name), variant, modules, tokenizer, configs["scheduler"])
