"""Full training of a small latent diffusion model in the SD 1.x layout, from scratch or from a checkpoint.

Two stages, both in `train_full`:

1. (optional) the VAE as an autoencoder on the data's images (L1 + MSE + a small KL term), then frozen; its
   `scaling_factor` is set so the latents have unit standard deviation, as Stable Diffusion's are;
2. the UNet and the CLIP text encoder together on the frozen VAE's latents: ε-prediction with the model's
   DDPM betas (so every standard sampler works), caption dropout for classifier-free guidance, min-SNR
   weighting, AdamW with warm-up and cosine decay, an EMA of the weights (the EMA is what gets saved).

Progress bars show the loss; sample grids are written every K steps; a checkpoint (`checkpoint.pt`: tensors and
plain values only, read back with `weights_only=True`) every C steps lets `--resume` continue a run exactly
where it stopped (the random numbers of each step depend only on the seed and the step); a loss-curve PNG is
written at the end. The result is saved as a single-file `.safetensors` in the original LDM key layout through
the SD 1.x family's writer, so it loads like any community checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .common import (
    EMA,
    ImageFolder,
    alphas_cumprod,
    high_noise_weights,
    image_grid,
    lr_factor,
    min_snr_weights,
    plot_loss,
    save_checkpoint,
    step_generator,
    to_pixels,
)
from .grounding import grounding_loss, grounding_token_ids, recording_cross_attention

log = logging.getLogger("sdcore.training")

SD1_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.42.1",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "trained_betas": None,
}


# --- the demo architecture ------------------------------------------------------------------------------


def demo_configs() -> dict[str, dict[str, Any]]:
    """The demo model: SD 1.x's building blocks and key layout with tiny widths and fewer levels (sized for a
    2-core CPU): 64×64 images, a 4× VAE (3 levels, 8/16/32 channels, one norm group so flat colours survive)
    giving 16×16×4 latents, a 3-level UNet (24/48/64 channels, cross-attention at 8×8 and 4×4, one head) and a
    3-layer CLIP text encoder 64 wide with CLIP's full 49408-token vocabulary, so the real tokenizer works."""
    unet = {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.42.1",
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [24, 48, 64],
        "layers_per_block": 1,
        "cross_attention_dim": 64,
        "attention_head_dim": 1,
        "norm_num_groups": 4,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_eps": 1e-5,
        "center_input_sample": False,
    }
    vae = {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.42.1",
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [8, 16, 32],
        "layers_per_block": 1,
        "norm_num_groups": 1,
        "act_fn": "silu",
        "sample_size": 64,
        "scaling_factor": 0.18215,
    }
    text_encoder = {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": 49408,
        "hidden_size": 64,
        "intermediate_size": 256,
        "projection_dim": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "torch_dtype": "float32",
    }
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    return {"model_index": index, "unet": unet, "vae": vae, "text_encoder": text_encoder,
            "scheduler": dict(SD1_SCHEDULER)}


def write_config_folder(folder: str | Path, configs: dict[str, dict[str, Any]] | None = None, *,
                        tokenizer: bool = True) -> Path:
    """A diffusers config folder without weights (model_index.json + unet/vae/text_encoder/scheduler configs,
    and with `tokenizer` the CLIP tokenizer files): what the SD 1.x family needs to load a single file of a
    non-standard architecture. sdcore falls back to its shipped CLIP tokenizer when the folder has none."""
    from sdcore.tokenizers import save_clip_tokenizer

    configs = configs or demo_configs()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def dump(path: Path, data: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    dump(folder / "model_index.json", configs["model_index"])
    dump(folder / "unet" / "config.json", configs["unet"])
    dump(folder / "vae" / "config.json", configs["vae"])
    dump(folder / "text_encoder" / "config.json", configs["text_encoder"])
    dump(folder / "scheduler" / "scheduler_config.json", configs["scheduler"])
    if tokenizer:
        save_clip_tokenizer(folder / "tokenizer")
    return folder


def read_config_folder(folder: str | Path) -> dict[str, dict[str, Any]]:
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers config folder (no model_index.json).")

    def load(*parts: str) -> dict[str, Any]:
        return json.loads((folder.joinpath(*parts)).read_text(encoding="utf-8"))

    return {
        "model_index": load("model_index.json"),
        "unet": load("unet", "config.json"),
        "vae": load("vae", "config.json"),
        "text_encoder": load("text_encoder", "config.json"),
        "scheduler": load("scheduler", "scheduler_config.json"),
    }


@dataclass
class Components:
    """The trainable parts of an SD 1.x model, as plain diffusers/transformers modules."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]
    configs: dict[str, dict[str, Any]] | None = None  # set when built from a config folder


def build_components(configs: dict[str, dict[str, Any]], seed: int = 0) -> Components:
    """Fresh, randomly initialised modules from configs (deterministic for a seed)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdcore.tokenizers import clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config({k: v for k, v in configs["unet"].items()})
    vae = AutoencoderKL.from_config({k: v for k, v in configs["vae"].items()})
    te_config = CLIPTextConfig(**{k: v for k, v in configs["text_encoder"].items()
                                  if k not in ("architectures", "model_type", "torch_dtype")})
    text_encoder = CLIPTextModel(te_config)
    return Components(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                      scheduler_config=dict(configs["scheduler"]), configs=configs)


def components_from_model(model: Any) -> Components:
    """The modules of a model loaded by the engine (`DiffusionModel`), for training in place."""
    parts = model.components()
    return Components(unet=parts["unet"], vae=parts["vae"], text_encoder=parts["text_encoder"],
                      tokenizer=parts["tokenizer"], scheduler_config=dict(model.scheduler_config))


# --- stage 1: the VAE -----------------------------------------------------------------------------------


def colour_augment(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Randomly remap each channel of some images (x in [-1, 1]) with a random affine map, so the autoencoder
    learns every colour, not only the ones in the data."""
    b = x.shape[0]
    apply = (torch.rand(b, 1, 1, 1, generator=generator) < p).float()
    scale = torch.empty(b, 3, 1, 1).uniform_(0.3, 1.0, generator=generator)
    sign = torch.where(torch.rand(b, 3, 1, 1, generator=generator) < 0.5, -1.0, 1.0)
    scale = scale * sign
    room = 1.0 - scale.abs()
    shift = (torch.rand(b, 3, 1, 1, generator=generator) * 2 - 1) * room
    mapped = (x * scale + shift).clamp(-1, 1)
    return apply * mapped + (1 - apply) * x


@torch.no_grad()
def init_vae_as_pooling(vae: Any, const: float = 50.0, offset: float = 10.0, logvar: float = -6.0) -> None:
    """Start an `AutoencoderKL` as (very nearly) exact block-average pooling and nearest-neighbour upsampling.

    A tiny VAE trained from random weights learns brightness and outlines quickly but colour (chroma) very
    slowly: in these images colour is a small part of the pixels, and the GroupNorm layers on the main path
    (`conv_norm_out` of encoder and decoder) remove each image's absolute level. So the autoencoder starts as a
    known map instead: every residual branch and the mid-block attention output are zeroed (the blocks become
    identities), the convolutions on the main path copy channels (down-sampling convs average 2×2 blocks), latent
    channels 0-2 hold the block's mean RGB and channel 3 is free for detail. The GroupNorms see the channels
    (rgb, -rgb, a constant): their per-image mean and variance are then constants, so their affine parameters
    can undo them. Training then only has to add detail.
    """
    import math

    latent = int(vae.config.latent_channels)
    for name, module in vae.named_modules():
        if (name.endswith("conv2") and ".resnets." in name) or name.endswith("to_out.0"):
            module.weight.zero_()
            if module.bias is not None:
                module.bias.zero_()

    def copy_conv(conv: Any, pairs: Sequence[tuple[int, int, float]]) -> None:
        conv.weight.zero_()
        if conv.bias is not None:
            conv.bias.zero_()
        k = conv.weight.shape[-1] // 2
        for out_c, in_c, value in pairs:
            conv.weight[out_c, in_c, k, k] = value

    def identity(conv: Any) -> None:
        n = min(conv.weight.shape[0], conv.weight.shape[1])
        copy_conv(conv, [(c, c, 1.0) for c in range(n)])

    def undo_norm(norm: Any) -> None:
        # the channels are rgb, -rgb, const and zeros: mean const/C and variance const²/C - (const/C)², always
        channels = norm.num_channels
        mean = const / channels
        std = math.sqrt(const**2 / channels - mean**2 + norm.eps)
        norm.weight.fill_(std)
        norm.bias.fill_(mean + offset)  # SiLU(x + offset) ≈ x + offset for |x| ≤ 1

    rgb_in = [(0, 0, 1.0), (1, 1, 1.0), (2, 2, 1.0), (3, 0, -1.0), (4, 1, -1.0), (5, 2, -1.0)]
    enc, dec = vae.encoder, vae.decoder
    copy_conv(enc.conv_in, rgb_in)
    enc.conv_in.bias[6] = const
    for block in enc.down_blocks:
        for resnet in block.resnets:
            if resnet.conv_shortcut is not None:
                identity(resnet.conv_shortcut)
        for down in block.downsamplers or []:
            down.conv.weight.zero_()
            down.conv.bias.zero_()
            for c in range(down.conv.weight.shape[0]):
                down.conv.weight[c, c, 0:2, 0:2] = 0.25  # the input is padded (0, 1, 0, 1): a 2×2 block mean
    undo_norm(enc.conv_norm_out)
    copy_conv(enc.conv_out, [(0, 0, 1.0), (1, 1, 1.0), (2, 2, 1.0)])
    enc.conv_out.bias[:3] = -offset
    enc.conv_out.bias[latent:] = 0.0
    if vae.quant_conv is not None:
        identity(vae.quant_conv)
        vae.quant_conv.bias[latent:] = logvar
    if vae.post_quant_conv is not None:
        identity(vae.post_quant_conv)
    copy_conv(dec.conv_in, rgb_in)
    dec.conv_in.bias[6] = const
    for block in dec.up_blocks:
        for resnet in block.resnets:
            if resnet.conv_shortcut is not None:
                identity(resnet.conv_shortcut)
        for up in block.upsamplers or []:
            identity(up.conv)
    undo_norm(dec.conv_norm_out)
    copy_conv(dec.conv_out, [(0, 0, 1.0), (1, 1, 1.0), (2, 2, 1.0)])
    dec.conv_out.bias[:] = -offset


def pooling_parameter_groups(vae: Any, lr: float) -> list[dict[str, Any]]:
    """After `init_vae_as_pooling`: optimizer groups that train without breaking the pooling path.

    The main path (conv_in, shortcuts, down/up-sampling convs, the output norms, the decoder's conv_out) stays
    frozen; the residual branches and attentions learn detail on top of it. The encoder's conv_out reads
    activations near `offset` (10), so a normal step there would move the latents a lot: only its row for the free
    latent channel (3) trains, at 1/100 of the learning rate."""
    frozen_suffixes = ("conv_shortcut.weight", "conv_shortcut.bias", "downsamplers.0.conv.weight",
                       "downsamplers.0.conv.bias", "upsamplers.0.conv.weight", "upsamplers.0.conv.bias")
    frozen_names = {"encoder.conv_in.weight", "encoder.conv_in.bias", "encoder.conv_norm_out.weight",
                    "encoder.conv_norm_out.bias", "decoder.conv_norm_out.weight", "decoder.conv_norm_out.bias",
                    "decoder.conv_out.weight", "decoder.conv_out.bias", "quant_conv.weight", "quant_conv.bias",
                    "post_quant_conv.weight", "post_quant_conv.bias"}
    slow_names = {"encoder.conv_out.weight", "encoder.conv_out.bias"}
    normal, slow = [], []
    for name, param in vae.named_parameters():
        if name in frozen_names or name.endswith(frozen_suffixes):
            param.requires_grad_(False)
            continue
        param.requires_grad_(True)
        (slow if name in slow_names else normal).append(param)
    free = 3

    def only_free_row(grad: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros_like(grad)
        mask[free] = 1
        return grad * mask

    def not_constant(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[6] = 0  # output channel 6 carries the constant
        return grad

    vae.encoder.conv_out.weight.register_hook(only_free_row)
    vae.encoder.conv_out.bias.register_hook(only_free_row)
    vae.decoder.conv_in.weight.register_hook(not_constant)
    vae.decoder.conv_in.bias.register_hook(not_constant)
    return [{"params": normal, "lr": lr, "base_lr": lr}, {"params": slow, "lr": lr / 100, "base_lr": lr / 100}]


@dataclass
class VaeSettings:
    steps: int = 300
    batch_size: int = 16
    crop: int | None = None  # train on random crops (aligned to the latent grid): the VAE is convolutional
    lr: float = 3e-4
    warmup: int = 100
    kl_weight: float = 1e-6
    pooling_init: bool = True  # start from exact block pooling / upsampling (see init_vae_as_pooling)
    initial_logvar: float = -6.0  # start with nearly deterministic latents, so details are learned from the start
    colour_augment: float = 0.3
    seed: int = 0


def random_crops(x: torch.Tensor, size: int, grid: int, generator: torch.Generator) -> torch.Tensor:
    """One random `size`×`size` crop per image, its corner on multiples of `grid` (the VAE's downsampling)."""
    b, _, h, w = x.shape
    if size >= h and size >= w:
        return x
    ys = torch.randint(0, (h - size) // grid + 1, (b,), generator=generator) * grid
    xs = torch.randint(0, (w - size) // grid + 1, (b,), generator=generator) * grid
    return torch.stack([x[i, :, int(ys[i]):int(ys[i]) + size, int(xs[i]):int(xs[i]) + size] for i in range(b)])


def train_vae(vae: Any, data: ImageFolder, settings: VaeSettings, *, work_dir: Path | None = None,
              progress: bool = True, log_every: int = 0) -> list[float]:
    """Train `vae` as an autoencoder on `data.images`; returns the losses. The VAE ends in eval mode, frozen,
    with `scaling_factor` set so that scaled latents have unit standard deviation."""
    from tqdm import tqdm

    vae.train().requires_grad_(True)
    latent = int(vae.config.latent_channels)
    if settings.pooling_init:
        init_vae_as_pooling(vae, logvar=settings.initial_logvar)
        groups = pooling_parameter_groups(vae, settings.lr)
    else:
        if settings.initial_logvar and vae.quant_conv is not None:
            with torch.no_grad():
                vae.quant_conv.bias[latent:] += settings.initial_logvar
        groups = [{"params": [p for p in vae.parameters() if p.requires_grad], "lr": settings.lr,
                   "base_lr": settings.lr}]
    params = [p for group in groups for p in group["params"]]
    grid = 2 ** (len(vae.config.block_out_channels) - 1)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.99), weight_decay=0.0)
    losses: list[float] = []
    n = len(data)
    bar = tqdm(range(settings.steps), desc="VAE", unit="step", disable=not progress, dynamic_ncols=True)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, settings.steps, settings.warmup)
        g = step_generator(settings.seed, step, stream=1)
        idx = torch.randint(0, n, (settings.batch_size,), generator=g)
        x = data.images[idx]
        if settings.crop:
            x = random_crops(x, settings.crop, grid, g)
        x = to_pixels(x)
        if settings.colour_augment > 0:
            x = colour_augment(x, g, settings.colour_augment)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        y = vae.decode(z).sample
        rec = (y - x).abs().mean() + F.mse_loss(y, x)
        kl = posterior.kl().mean()
        loss = rec + settings.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(rec.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if log_every and (step + 1) % log_every == 0:
            recent = losses[-log_every:]
            log.info("vae step %d rec %.4f kl %.1f", step + 1, sum(recent) / len(recent), float(kl))
    vae.eval().requires_grad_(False)
    scale = latent_scaling_factor(vae, data)
    vae.register_to_config(scaling_factor=scale)
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
        plot_loss(losses, work_dir / "vae_loss.png", title="VAE reconstruction loss (L1 + MSE)")
        with torch.no_grad():
            x = to_pixels(data.images[:16])
            y = vae.decode(vae.encode(x).latent_dist.mode()).sample
        pics = [_to_pil(t) for t in torch.cat([x, y])]
        image_grid(pics, 16, scale=2).save(work_dir / "vae_reconstruction.png")
    return losses


@torch.no_grad()
def latent_scaling_factor(vae: Any, data: ImageFolder, count: int = 512) -> float:
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(data), generator=g)[:count]
    latents = torch.cat([vae.encode(to_pixels(data.images[idx[i:i + 64]])).latent_dist.mode()
                         for i in range(0, len(idx), 64)])
    return float(1.0 / latents.flatten().std())


def _to_pil(t: torch.Tensor) -> Any:
    from PIL import Image

    array = ((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


# --- stage 2: UNet + text encoder ------------------------------------------------------------------------


DEFAULT_SAMPLE_PROMPTS = (
    "a red circle at the top left on a white background",
    "a large blue square in the centre on a black background",
    "a small green triangle at the bottom right on a gray background",
    "a yellow star on the left on a black and white background",
    "a large purple circle at the bottom on a gray and black background",
    "an orange triangle at the top right on a white background",
    "a small blue star at the bottom left on a white and gray background",
    "a large red square on the right on a black background",
)


@dataclass
class DiffusionSettings:
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    noise_offset: float = 0.05
    pyramid_noise: float = 0.0  # > 0: multi-resolution noise with this discount per halving (see pyramid_noise)
    high_noise_weight: float = 0.0  # > 1: cap of the extra weight of high-noise steps (common.high_noise_weights)
    pure_noise_fraction: float = 0.0  # share of samples trained as the sampler's first step: t = T-1, no signal
    pure_noise_loss: str = "image"  # their loss: "image" (MSE of the predicted image) or "epsilon" (as the rest)
    grounding_weight: float = 0.0  # > 0: weight of the token-grounding loss (grounding.py; needs NAME.mask.png)
    grounding_words: Sequence[str] = ()  # the caption words whose attention is grounded on the mask
    train_text_encoder: bool = True
    grad_clip: float = 1.0
    sample_every: int = 500
    sample_prompts: Sequence[str] = DEFAULT_SAMPLE_PROMPTS
    sample_steps: int = 20
    sample_cfg: float = 5.0
    checkpoint_every: int = 500
    seed: int = 0


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, discount: float) -> torch.Tensor:
    """Add noise at every coarser resolution (halving down to 1×1, weight discount**level), then rescale to unit
    variance. SD's betas leave about 7% of the image in the latents at t = 999, which is enough for a small model to
    read the layout and the background from the noise instead of from the caption; extra low-frequency noise
    hides that leak during training, so layout and background follow the text (a training-only change: sampling
    is unchanged, as with offset noise)."""
    b, c, h, w = noise.shape
    out = noise.clone()
    level, size = 1, min(h, w)
    while size > 1:
        size = max(1, size // 2)
        low = torch.randn((b, c, size, size), generator=generator)
        out = out + discount**level * F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
        level += 1
    return out / out.std()


def tokenize_captions(tokenizer: Any, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique captions as 77-token rows (BOS, tokens, EOS, padding; what the SD 1.x family feeds the text encoder
    for a prompt of one chunk) and each caption's row index."""
    unique: dict[str, int] = {}
    index = [unique.setdefault(c, len(unique)) for c in captions]
    texts = list(unique)
    ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return ids, torch.tensor(index, dtype=torch.long)


@torch.no_grad()
def encode_dataset(vae: Any, data: ImageFolder, batch: int = 128, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and standard deviation of every image (the VAE is frozen, so this happens once)."""
    from tqdm import tqdm

    means, stds = [], []
    for i in tqdm(range(0, len(data), batch), desc="Encoding latents", unit="batch", disable=not progress,
                  leave=False, dynamic_ncols=True):
        dist = vae.encode(to_pixels(data.images[i:i + batch])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


class DiffusionTrainer:
    """Trains the UNet (and the text encoder) of `components` on `data`, with its VAE frozen."""

    def __init__(self, components: Components, data: ImageFolder, settings: DiffusionSettings,
                 work_dir: Path, progress: bool = True) -> None:
        self.c = components
        self.data = data
        self.s = settings
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self.prediction_type = components.scheduler_config.get("prediction_type", "epsilon")
        self.acp = alphas_cumprod(components.scheduler_config)
        self.scale = float(components.vae.config.scaling_factor)
        components.vae.eval().requires_grad_(False)
        self.means, self.stds = encode_dataset(components.vae, data, progress=progress)
        self.ids, self.caption_index = tokenize_captions(components.tokenizer, data.captions)
        self.uncond = components.tokenizer([""], padding="max_length", max_length=77,
                                           return_tensors="pt").input_ids[0]
        unet, te = components.unet, components.text_encoder
        unet.train().requires_grad_(True)
        te.train().requires_grad_(settings.train_text_encoder)
        self.params = [p for p in unet.parameters() if p.requires_grad]
        if settings.train_text_encoder:
            self.params += [p for p in te.parameters() if p.requires_grad]
        # no weight decay: it would also shrink the rows of the 49408-token embedding table that no caption uses
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, betas=(0.9, 0.99), weight_decay=0.0)
        self.ema = EMA(self.params, settings.ema_decay)
        self.grounded: torch.Tensor | None = None
        if settings.grounding_weight > 0:
            if data.masks is None:
                raise ValueError("--grounding-weight needs subject masks: NAME.mask.png beside each NAME.png "
                                 "(white where the subject is), as `sdcore demo data` writes them.")
            if not settings.grounding_words:
                raise ValueError("--grounding-weight needs --grounding-words: the caption words to ground.")
            self.grounded = grounding_token_ids(components.tokenizer, settings.grounding_words)
        self.step = 0
        self.losses: list[float] = []

    # -- checkpoints --------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "kind": "sdcore-full",
            "step": self.step,
            "unet": self.c.unet.state_dict(),
            "text_encoder": self.c.text_encoder.state_dict(),
            "vae": self.c.vae.state_dict(),
            "vae_scaling_factor": self.scale,
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "losses": list(self.losses),
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.s).items()},
        }

    def load_state(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "sdcore-full":
            raise ValueError("This checkpoint was not written by `sdcore train full`.")
        self.c.unet.load_state_dict(state["unet"])
        self.c.text_encoder.load_state_dict(state["text_encoder"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.losses = [float(x) for x in state["losses"]]

    def save_checkpoint(self) -> Path:
        path = self.work_dir / "checkpoint.pt"
        save_checkpoint(path, self.state())
        return path

    # -- training -----------------------------------------------------------------------------------------
    def _draw_index(self, g: torch.Generator) -> torch.Tensor:
        return torch.randint(0, len(self.data), (self.s.batch_size,), generator=g)

    def batch_index(self, step: int) -> torch.Tensor:
        """Which images make up the batch of `step` (the first draw of that step's generator, as in `batch`)."""
        return self._draw_index(step_generator(self.s.seed, step, stream=2))

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents, noise, timesteps, caption token ids and, per sample, whether its noisy input keeps the signal."""
        s, g = self.s, step_generator(self.s.seed, step, stream=2)
        idx = self._draw_index(g)
        z = (self.means[idx] + self.stds[idx] * torch.randn(self.means[idx].shape, generator=g)) * self.scale
        noise = torch.randn(z.shape, generator=g)
        if s.pyramid_noise > 0:
            noise = pyramid_noise(noise, g, s.pyramid_noise)
        elif s.noise_offset:
            noise = noise + s.noise_offset * torch.randn((z.shape[0], z.shape[1], 1, 1), generator=g)
        t = torch.randint(0, len(self.acp), (s.batch_size,), generator=g)
        ids = self.ids[self.caption_index[idx]].clone()
        drop = torch.rand(s.batch_size, generator=g) < s.caption_dropout
        ids[drop] = self.uncond
        keep_signal = torch.ones(s.batch_size, dtype=torch.bool)
        if s.pure_noise_fraction > 0:
            # drawn last, so the numbers above are the same with and without this option
            keep_signal = torch.rand(s.batch_size, generator=g) >= s.pure_noise_fraction
            t = torch.where(keep_signal, t, len(self.acp) - 1)
        return z, noise, t, ids, keep_signal

    def loss(self, z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ids: torch.Tensor,
             keep_signal: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Min-SNR-weighted MSE of the model's prediction.

        Samples without signal are what a sampler feeds the model at its first step: pure noise at t = T-1. SD's
        betas leave about 7% of the image in a training input at t = T-1, enough for a small model to read the
        layout (position, two-colour background) from it and to ignore the caption; at sampling time there is none,
        so such a model draws the layout of the noise. For these samples the target is the ε that would take the
        noisy input to the true image (ε = (x_t - √ᾱ·z) / √(1-ᾱ)), which only the caption can tell.

        With `grounding_weight` and the batch's image `index`, the token-grounding loss (grounding.py) of the
        samples with a mask is added."""
        a = self.acp[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z * keep_signal.view(-1, 1, 1, 1) + (1 - a).sqrt() * noise
        epsilon = (noisy - a.sqrt() * z) / (1 - a).sqrt()  # = noise where the signal is kept
        hidden = self.c.text_encoder(input_ids=ids).last_hidden_state
        grounding = torch.zeros(())
        if self.grounded is not None and index is not None:
            with recording_cross_attention(self.c.unet) as recorder:
                recorder.maps = []
                pred = self.c.unet(noisy, t, encoder_hidden_states=hidden).sample
            assert self.data.masks is not None and self.data.has_mask is not None
            has = self.data.has_mask[index]
            if bool(has.any()):
                masks = self.data.masks[index][has].float() / 255.0
                grounding = grounding_loss([m[has] for m in recorder.maps], ids[has], self.grounded, masks)
        else:
            pred = self.c.unet(noisy, t, encoder_hidden_states=hidden).sample
        target = epsilon if self.prediction_type == "epsilon" else a.sqrt() * epsilon - (1 - a).sqrt() * z
        per_sample = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
        weights = min_snr_weights(self.acp, t, self.s.min_snr_gamma, self.prediction_type)
        weights = weights * high_noise_weights(self.acp, t, self.s.high_noise_weight)
        if self.s.pure_noise_loss == "image" and not bool(keep_signal.all()):
            # With no signal in the input, the ε error is the image error times √(ᾱ/(1-ᾱ)) ≈ 0.07 at t = T-1, so
            # an ε loss hardly teaches the one thing these samples are for; the predicted image's error does.
            if self.prediction_type == "epsilon":
                predicted = (noisy - (1 - a).sqrt() * pred.float()) / a.sqrt()
            else:
                predicted = a.sqrt() * noisy - (1 - a).sqrt() * pred.float()
            image_error = (predicted - z).pow(2).mean(dim=(1, 2, 3))
            per_sample = torch.where(keep_signal, per_sample, image_error)
            weights = torch.where(keep_signal, weights, 1.0)
        return (per_sample * weights).mean() + self.s.grounding_weight * grounding

    def train(self, on_step: Callable[[int, float], None] | None = None) -> list[float]:
        from tqdm import tqdm

        s = self.s
        bar = tqdm(total=s.steps, initial=self.step, desc="Training", unit="step", disable=not self.progress,
                   dynamic_ncols=True)
        started = time.time()
        while self.step < s.steps:
            step = self.step
            for group in self.optimizer.param_groups:
                group["lr"] = s.lr * lr_factor(step, s.steps, s.warmup)
            loss = self.loss(*self.batch(step), index=self.batch_index(step))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if s.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params, s.grad_clip)
            self.optimizer.step()
            self.ema.update(step)
            value = float(loss.detach())
            self.losses.append(value)
            self.step += 1
            recent = self.losses[-50:]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
            bar.update(1)
            if on_step is not None:
                on_step(self.step, value)
            if s.sample_every and (self.step % s.sample_every == 0 or self.step == s.steps):
                self.write_samples()
            if s.checkpoint_every and (self.step % s.checkpoint_every == 0 or self.step == s.steps):
                self.save_checkpoint()
        bar.close()
        log.info("diffusion training: %d steps in %.0f s", s.steps, time.time() - started)
        plot_loss(self.losses, self.work_dir / "loss.png", title="diffusion loss (min-SNR weighted MSE)")
        return self.losses

    # -- samples ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def write_samples(self) -> Path:
        self.ema.swap()
        try:
            images = sample_images(self.c, list(self.s.sample_prompts), seed=self.s.seed, steps=self.s.sample_steps,
                                   cfg=self.s.sample_cfg)
        finally:
            self.ema.swap()
            self.c.unet.train()
            self.c.text_encoder.train()
        folder = self.work_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step_{self.step:06d}.png"
        image_grid(images, min(8, len(images)), scale=2).save(path)
        return path

    def use_ema(self) -> None:
        """Put the averaged weights into the modules (for saving)."""
        self.ema.swap()
        self.c.unet.eval().requires_grad_(False)
        self.c.text_encoder.eval().requires_grad_(False)


@torch.no_grad()
def sample_images(c: Components, prompts: list[str], seed: int = 0, steps: int = 20, cfg: float = 5.0,
                  size: int | None = None) -> list[Any]:
    """Quick previews with DDIM and classifier-free guidance (the engine is not needed while training)."""
    from diffusers import DDIMScheduler

    c.unet.eval()
    c.text_encoder.eval()
    # "trailing": the first step is at t = T-1 from pure noise, as sdcore's samplers (and A1111's) start
    scheduler = DDIMScheduler.from_config({**{k: v for k, v in c.scheduler_config.items() if not k.startswith("_")},
                                           "timestep_spacing": "trailing"})
    scheduler.set_timesteps(steps)
    ids = c.tokenizer(prompts + [""], padding="max_length", max_length=77, truncation=True,
                      return_tensors="pt").input_ids
    hidden = c.text_encoder(input_ids=ids).last_hidden_state
    cond, uncond = hidden[:-1], hidden[-1:].expand(len(prompts), -1, -1)
    factor = 2 ** (len(c.vae.config.block_out_channels) - 1)
    side = (size or int(c.unet.config.sample_size) * factor) // factor
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn((len(prompts), int(c.unet.config.in_channels), side, side), generator=g)
    for t in scheduler.timesteps:
        both = c.unet(torch.cat([latents, latents]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
        u, p = both.chunk(2)
        latents = scheduler.step(u + cfg * (p - u), t, latents).prev_sample
    pixels = c.vae.decode(latents / c.vae.config.scaling_factor).sample
    return [_to_pil(x) for x in pixels]
