"""LoRA training for SD 1.x models, saved in kohya's key layout (what A1111, ComfyUI, diffusers and sdcore load).

Targets are kohya's defaults for SD 1.x ("networks.lora"): every `Linear` and 1×1 `Conv2d` inside the UNet's
`Transformer2DModel` blocks (attn1/attn2 q, k, v, out, the feed-forward, proj_in/proj_out) and inside the CLIP
text encoder's attention and MLP blocks. A module `down_blocks.0.attentions.0.proj_in` is saved as

    lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight   [rank, in] (or [rank, in, 1, 1])
    lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight     [out, rank] (or [out, rank, 1, 1])
    lora_unet_down_blocks_0_attentions_0_proj_in.alpha              scalar

and `text_model.encoder.layers.0.self_attn.q_proj` as `lora_te_text_model_encoder_layers_0_self_attn_q_proj.*`.
The effective update is `W += (alpha / rank) · up @ down` (times the user's weight), as in kohya and A1111.

The layers are peft's (`peft.inject_adapter_in_model` with a `LoraConfig` listing exactly those modules, kohya's
initialisation), the loop runs under `accelerate` (device, mixed precision, backward), and the file is written
from the peft layers' `lora_A` / `lora_B` under kohya's names.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .common import (
    ImageFolder,
    alphas_cumprod,
    image_grid,
    load_checkpoint,
    lr_factor,
    min_snr_weights,
    plot_loss,
    save_checkpoint,
    step_generator,
)
from .train import Components, encode_dataset, sample_images, tokenize_captions

log = logging.getLogger("sdcore.training")

UNET_PREFIX = "lora_unet"
TE_PREFIX = "lora_te"
UNET_TARGETS = ("Transformer2DModel",)
TE_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")


def _is_target_leaf(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)


def kohya_name(prefix: str, path: str) -> str:
    return f"{prefix}_{path.replace('.', '_')}"


def text_encoder_path(path: str) -> str:
    """transformers >= 5.6 builds CLIPTextModel without the `text_model.` level; kohya names always have it."""
    return path if path.startswith("text_model.") else f"text_model.{path}"


def target_paths(root: nn.Module, targets: Sequence[str]) -> list[str]:
    """Module paths (from `root`) of every Linear and 1×1 Conv2d inside the modules whose class is in `targets`."""
    paths: list[str] = []
    for name, module in root.named_modules():
        if type(module).__name__ not in targets:
            continue
        paths += [f"{name}.{child_name}" for child_name, child in module.named_modules()
                  if child_name and _is_target_leaf(child)]
    return paths


def _kohya_name_of(prefix: str, path: str) -> str:
    return kohya_name(prefix, text_encoder_path(path) if prefix == TE_PREFIX else path)


def target_modules(unet: nn.Module | None, text_encoder: nn.Module | None) -> dict[str, nn.Module]:
    """kohya name -> module for every layer a kohya SD 1.x LoRA may patch."""
    found: dict[str, nn.Module] = {}
    for prefix, root, targets in ((UNET_PREFIX, unet, UNET_TARGETS), (TE_PREFIX, text_encoder, TE_TARGETS)):
        if root is not None:
            for path in target_paths(root, targets):
                found[_kohya_name_of(prefix, path)] = root.get_submodule(path)
    return found


ADAPTER = "sdcore"  # the peft adapter name the trainer injects


class LoRANetwork:
    """The LoRA layers peft injects into a UNet and a text encoder, addressed by kohya name.

    `peft.inject_adapter_in_model` replaces every target Linear / 1×1 Conv2d with a peft LoRA layer (`lora_A` is
    kohya's `lora_down`, `lora_B` its `lora_up`, `scaling` = alpha / rank; the base layer is frozen and unchanged).
    `state_dict_kohya()` gives the file's tensors, `set_multiplier` scales every update (0 turns the LoRA off for
    sample images), and `remove()` puts the original layers back, so the model is exactly as before."""

    def __init__(self, unet: nn.Module | None, text_encoder: nn.Module | None, rank: int, alpha: float) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        self.rank, self.alpha = rank, float(alpha)
        self.loras: dict[str, nn.Module] = {}
        self._places: list[tuple[nn.Module, str, str]] = []  # (root, path, kohya name)
        for prefix, root, targets in ((UNET_PREFIX, unet, UNET_TARGETS), (TE_PREFIX, text_encoder, TE_TARGETS)):
            if root is None:
                continue
            paths = target_paths(root, targets)
            if not paths:
                continue
            # exact paths: peft matches a listed name against the whole module path (or a dotted suffix of it)
            config = LoraConfig(r=rank, lora_alpha=float(alpha), target_modules=paths, lora_dropout=0.0, bias="none",
                                init_lora_weights=True)  # kohya's init: A kaiming-uniform, B zeros
            inject_adapter_in_model(config, root, adapter_name=ADAPTER)
            for path in paths:
                name = _kohya_name_of(prefix, path)
                self.loras[name] = root.get_submodule(path)
                self._places.append((root, path, name))

    def parameters(self, prefix: str | None = None) -> list[nn.Parameter]:
        """The trainable tensors (of the UNet's or the text encoder's layers only, with `prefix`)."""
        return [p for name, layer in self.loras.items() if prefix is None or name.startswith(prefix + "_")
                for p in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)]

    def set_multiplier(self, multiplier: float) -> None:
        for layer in self.loras.values():
            layer.set_scale(ADAPTER, multiplier)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """float32 copies of every `lora_down` / `lora_up`, by kohya key (for checkpoints)."""
        return self.state_dict_kohya(torch.float32, with_alpha=False)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, layer in self.loras.items():
                layer.lora_A[ADAPTER].weight.copy_(state[f"{name}.lora_down.weight"])
                layer.lora_B[ADAPTER].weight.copy_(state[f"{name}.lora_up.weight"])

    def state_dict_kohya(self, dtype: torch.dtype = torch.float16, *, with_alpha: bool = True) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, layer in self.loras.items():
            out[f"{name}.lora_down.weight"] = layer.lora_A[ADAPTER].weight.detach().to("cpu", dtype).contiguous()
            out[f"{name}.lora_up.weight"] = layer.lora_B[ADAPTER].weight.detach().to("cpu", dtype).contiguous()
            if with_alpha:
                out[f"{name}.alpha"] = torch.tensor(self.alpha, dtype=dtype)
        return out

    def remove(self) -> None:
        """Replace each peft layer by the original layer it wraps (idempotent)."""
        for root, path, _ in self._places:
            parent_path, _, child = path.rpartition(".")
            parent = root.get_submodule(parent_path) if parent_path else root
            layer = getattr(parent, child)
            if hasattr(layer, "get_base_layer"):
                setattr(parent, child, layer.get_base_layer())
        for root in {id(r): r for r, _, _ in self._places}.values():
            if "peft_config" in vars(root):
                del root.peft_config  # what inject_adapter_in_model leaves on the model
        self._places.clear()


# --- reading and applying kohya files ------------------------------------------------------------------


def load_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return load_file(str(path)), metadata


def lora_deltas(state: dict[str, torch.Tensor], modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """kohya name -> the weight update `(alpha/rank) · up @ down` (shaped like the module's weight)."""
    deltas: dict[str, torch.Tensor] = {}
    names = {k.split(".", 1)[0] for k in state if k.endswith(".lora_down.weight")}
    missing = sorted(n for n in names if n not in modules)
    if missing:
        raise KeyError(f"LoRA modules not in this model: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    for name in names:
        down = state[f"{name}.lora_down.weight"].float()
        up = state[f"{name}.lora_up.weight"].float()
        rank = down.shape[0]
        alpha = float(state[f"{name}.alpha"]) if f"{name}.alpha" in state else float(rank)
        weight = modules[name].weight
        delta = (up.flatten(1) @ down.flatten(1)) * (alpha / rank)
        deltas[name] = delta.reshape(weight.shape)
    return deltas


@contextmanager
def applied_lora(unet: nn.Module, text_encoder: nn.Module | None, path: str | Path | None,
                 weight: float = 1.0) -> Iterator[int]:
    """Merge a kohya LoRA into the weights for the `with` block, then put the exact original weights back.
    Yields the number of patched modules (0 for `path` None)."""
    if path is None:
        yield 0
        return
    state, _ = load_lora_file(path)
    modules = target_modules(unet, text_encoder)
    deltas = lora_deltas(state, modules)
    saved = {}
    with torch.no_grad():
        for name, delta in deltas.items():
            w = modules[name].weight
            saved[name] = w.detach().clone()
            w.add_(delta.to(w.dtype), alpha=weight)
    try:
        yield len(deltas)
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                modules[name].weight.copy_(original)


# --- training -------------------------------------------------------------------------------------------


@dataclass
class LoraSettings:
    rank: int = 4
    alpha: float = 4.0
    steps: int = 500
    batch_size: int = 16
    lr: float = 1e-3
    text_encoder_lr: float | None = None  # default: lr
    train_text_encoder: bool = True
    warmup: int = 20
    caption_dropout: float = 0.0
    min_snr_gamma: float = 5.0
    noise_offset: float = 0.0
    grad_clip: float = 1.0
    resolution: int | None = None  # default: the model's native size
    sample_every: int = 0
    sample_prompts: Sequence[str] = ()
    sample_steps: int = 20
    sample_cfg: float = 5.0
    checkpoint_every: int = 0
    seed: int = 0
    mixed_precision: str = "no"  # accelerate's: "no", "fp16", "bf16"


class LoraTrainer:
    """Trains a kohya LoRA on a frozen model."""

    def __init__(self, components: Components, data: ImageFolder, settings: LoraSettings, work_dir: Path,
                 progress: bool = True) -> None:
        self.c, self.data, self.s = components, data, settings
        self.work_dir = Path(work_dir)
        self.progress = progress
        for module in (components.unet, components.text_encoder, components.vae):
            module.eval().requires_grad_(False)
        self.dtype = components.unet.dtype
        self.prediction_type = components.scheduler_config.get("prediction_type", "epsilon")
        self.acp = alphas_cumprod(components.scheduler_config)
        self.scale = float(components.vae.config.scaling_factor)
        self.means, self.stds = encode_dataset(components.vae, data, progress=progress)
        self.ids, self.caption_index = tokenize_captions(components.tokenizer, data.captions)
        self.uncond = components.tokenizer([""], padding="max_length", max_length=77,
                                           return_tensors="pt").input_ids[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)  # the same LoRA initialisation for a given seed
            self.network = LoRANetwork(components.unet,
                                       components.text_encoder if settings.train_text_encoder else None,
                                       settings.rank, settings.alpha)
        unet_params = self.network.parameters(UNET_PREFIX)
        te_params = self.network.parameters(TE_PREFIX)
        for param in unet_params + te_params:
            param.requires_grad_(True)
        groups = [{"params": unet_params, "lr": settings.lr, "base_lr": settings.lr}]
        if te_params:
            te_lr = settings.text_encoder_lr if settings.text_encoder_lr is not None else settings.lr
            groups.append({"params": te_params, "lr": te_lr, "base_lr": te_lr})
        self.params = unet_params + te_params
        from accelerate import Accelerator

        # accelerate owns the device, mixed precision and the backward pass (the same loop on CPU and GPUs)
        self.accelerator = Accelerator(cpu=components.unet.device.type == "cpu",
                                       mixed_precision=settings.mixed_precision)
        self.optimizer = self.accelerator.prepare(torch.optim.AdamW(groups, betas=(0.9, 0.99), weight_decay=0.0))
        self.step = 0
        self.losses: list[float] = []

    # -- checkpoints --------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"kind": "sdcore-lora", "step": self.step, "network": self.network.state_dict(),
                "optimizer": self.optimizer.state_dict(), "losses": list(self.losses),
                "rank": self.s.rank, "alpha": float(self.s.alpha)}

    def load_state(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "sdcore-lora":
            raise ValueError("This checkpoint was not written by `sdcore train lora`.")
        if int(state["rank"]) != self.s.rank:
            raise ValueError(f"The checkpoint has rank {state['rank']}, not {self.s.rank}.")
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.losses = [float(x) for x in state["losses"]]

    def save_checkpoint(self) -> Path:
        path = self.work_dir / "checkpoint.pt"
        save_checkpoint(path, self.state())
        return path

    def resume(self, path: str | Path) -> None:
        self.load_state(load_checkpoint(path))

    # -- the loop -----------------------------------------------------------------------------------------
    def loss(self, step: int) -> torch.Tensor:
        s = self.s
        g = step_generator(s.seed, step, stream=3)
        idx = torch.randint(0, len(self.data), (s.batch_size,), generator=g)
        z = (self.means[idx] + self.stds[idx] * torch.randn(self.means[idx].shape, generator=g)) * self.scale
        noise = torch.randn(z.shape, generator=g)
        if s.noise_offset:
            noise = noise + s.noise_offset * torch.randn((z.shape[0], z.shape[1], 1, 1), generator=g)
        t = torch.randint(0, len(self.acp), (s.batch_size,), generator=g)
        ids = self.ids[self.caption_index[idx]].clone()
        if s.caption_dropout:
            ids[torch.rand(s.batch_size, generator=g) < s.caption_dropout] = self.uncond
        device = self.accelerator.device
        a = self.acp[t].view(-1, 1, 1, 1)
        noisy = (a.sqrt() * z + (1 - a).sqrt() * noise).to(device, self.dtype)
        with self.accelerator.autocast():
            hidden = self.c.text_encoder(input_ids=ids.to(device)).last_hidden_state
            pred = self.c.unet(noisy, t.to(device), encoder_hidden_states=hidden).sample.float().cpu()
        target = noise if self.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * z
        per_sample = (pred - target).pow(2).mean(dim=(1, 2, 3))
        return (per_sample * min_snr_weights(self.acp, t, s.min_snr_gamma, self.prediction_type)).mean()

    def train(self) -> list[float]:
        from tqdm import tqdm

        s = self.s
        bar = tqdm(total=s.steps, initial=self.step, desc="Training LoRA", unit="step", disable=not self.progress,
                   dynamic_ncols=True)
        started = time.time()
        while self.step < s.steps:
            factor = lr_factor(self.step, s.steps, s.warmup)
            for group in self.optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            loss = self.loss(self.step)
            self.optimizer.zero_grad(set_to_none=True)
            self.accelerator.backward(loss)
            if s.grad_clip:
                self.accelerator.clip_grad_norm_(self.params, s.grad_clip)
            self.optimizer.step()
            self.losses.append(float(loss.detach()))
            self.step += 1
            recent = self.losses[-20:]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
            bar.update(1)
            if s.sample_every and s.sample_prompts and (self.step % s.sample_every == 0 or self.step == s.steps):
                self.write_samples()
            if s.checkpoint_every and (self.step % s.checkpoint_every == 0 or self.step == s.steps):
                self.save_checkpoint()
        bar.close()
        log.info("LoRA training: %d steps in %.0f s", s.steps, time.time() - started)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        plot_loss(self.losses, self.work_dir / "loss.png", title="LoRA loss (min-SNR weighted MSE)")
        return self.losses

    @torch.no_grad()
    def write_samples(self) -> Path:
        prompts = list(self.s.sample_prompts)
        images = []
        for multiplier in (0.0, 1.0):
            self.network.set_multiplier(multiplier)
            images += sample_images(self.c, prompts, seed=self.s.seed, steps=self.s.sample_steps, cfg=self.s.sample_cfg)
        self.network.set_multiplier(1.0)
        folder = self.work_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step_{self.step:06d}.png"
        image_grid(images, len(prompts), scale=2).save(path)  # first row without the LoRA, second with it
        return path

    def save(self, out: str | Path, metadata: dict[str, str] | None = None) -> Path:
        """Write the kohya-layout `.safetensors` (fp16 tensors, kohya's `ss_*` metadata)."""
        from safetensors.torch import save_file

        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(self.s.rank),
            "ss_network_alpha": str(float(self.s.alpha)),
            "ss_base_model_version": "sd_v1",
            "ss_output_name": out.stem,
            "ss_steps": str(self.step),
            "ss_training_comment": "trained with sdcore train lora",
            "sdcore_settings": json.dumps({k: (list(v) if isinstance(v, tuple) else v)
                                           for k, v in asdict(self.s).items()}),
            **(metadata or {}),
        }
        if not self.s.train_text_encoder:
            meta["ss_network_train_unet_only"] = "True"
        save_file(self.network.state_dict_kohya(), str(out), metadata=meta)
        out.chmod(0o644)
        return out

    def close(self) -> None:
        """Take the LoRA layers off the model (the model is exactly as before afterwards)."""
        self.network.remove()


__all__ = ["LoRANetwork", "LoraSettings", "LoraTrainer", "applied_lora", "image_grid",
           "kohya_name", "load_lora_file", "lora_deltas", "plot_loss", "target_modules"]
