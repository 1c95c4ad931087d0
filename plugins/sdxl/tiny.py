"""Tiny random-weight SDXL models for tests: the real block layouts (3 UNet levels for base/inpaint, 4 for the
refiner; text_time conditioning; 8x VAE), tiny widths, the real vocabulary. The second text encoder has 10
layers and a different width from the first, so single files are laid out (and detected) like real ones."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from sdcore_plugins import sdcommon

from sdcore.checkpoints import ModelSource
from sdcore.errors import InvalidRequest
from sdcore.models import LoadOptions
from sdcore.tokenizers import clip_tokenizer

if TYPE_CHECKING:
    from .family import SDXLFamily
    from .model import SDXLModel

TIME_DIM = 8
TEXT_1 = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 3, "num_attention_heads": 2,
          "projection_dim": 32}
TEXT_2 = {"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 10, "num_attention_heads": 2,
          "projection_dim": 64}
TINY_UNET = {
    "block_out_channels": [8, 16, 32],
    "attention_head_dim": [2, 4, 8],
    "transformer_layers_per_block": [1, 1, 2],
    "cross_attention_dim": TEXT_1["hidden_size"] + TEXT_2["hidden_size"],
    "addition_time_embed_dim": TIME_DIM,
    "projection_class_embeddings_input_dim": 6 * TIME_DIM + TEXT_2["projection_dim"],
    "norm_num_groups": 8,
    "sample_size": 8,
}
TINY_REFINER_UNET = {
    "block_out_channels": [8, 16, 16, 16],
    "attention_head_dim": [2, 4, 4, 4],
    "transformer_layers_per_block": 2,
    "cross_attention_dim": TEXT_2["hidden_size"],
    "addition_time_embed_dim": TIME_DIM,
    "projection_class_embeddings_input_dim": 5 * TIME_DIM + TEXT_2["projection_dim"],
    "norm_num_groups": 8,
    "sample_size": 8,
}
TINY_VAE = {"block_out_channels": [8, 8, 16, 16], "norm_num_groups": 8, "sample_size": 64}


def tiny_configs(family: SDXLFamily, variant: str) -> dict[str, dict[str, Any]]:
    """The shipped real configs of `variant` with tiny widths (same block types, layers, activations)."""
    folder = family.config_folder(variant)
    refiner = variant == "sdxl-refiner"
    configs = {
        "unet": {**sdcommon.read_component_config(folder, "unet"), **(TINY_REFINER_UNET if refiner else TINY_UNET)},
        "vae": {**sdcommon.read_component_config(folder, "vae"), **TINY_VAE},
        "text_encoder_2": {**sdcommon.read_component_config(folder, "text_encoder_2"), **TEXT_2},
        "scheduler": sdcommon.read_component_config(folder, "scheduler"),
    }
    if not refiner:
        configs["text_encoder"] = {**sdcommon.read_component_config(folder, "text_encoder"), **TEXT_1}
    return configs


def build_tiny(family: SDXLFamily, variant: str, seed: int = 0, dtype: str | torch.dtype = "float32") -> SDXLModel:
    from .model import SDXLModel

    if variant not in family.variants:
        raise InvalidRequest(f"unknown sdxl variant {variant!r}; known: {', '.join(family.variants)}")
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else sdcommon.torch_dtype(dtype)
    configs = tiny_configs(family, variant)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules = {
            "unet": sdcommon.unet_factory(configs["unet"])(),
            "vae": sdcommon.vae_factory(configs["vae"])(),
        }
        if "text_encoder" in configs:
            modules["text_encoder"] = sdcommon.text_encoder_factory(configs["text_encoder"])()
        modules["text_encoder_2"] = sdcommon.text_encoder_factory(configs["text_encoder_2"], with_projection=True)()
    for module in modules.values():
        torch.nn.Module.to(module, torch_dtype)  # the plain cast (diffusers' .to() warns about fp32 modules)
        module.eval().requires_grad_(False)
    tokenizers = {"tokenizer_2": clip_tokenizer("!")}
    if "text_encoder" in modules:
        tokenizers["tokenizer"] = clip_tokenizer("<|endoftext|>")
    source = ModelSource(location=f"tiny-{variant}", kind="diffusers")
    options = LoadOptions(dtype=str(torch_dtype).removeprefix("torch."))
    return SDXLModel(source, options, variant, modules, tokenizers, configs["scheduler"])
