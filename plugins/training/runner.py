"""What the CLI commands do: load data and models, run the trainers, save the results."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import torch

log = logging.getLogger("sdcore.training")


def _engine(device: str = "cpu") -> Any:
    from sdcore.engine import Engine

    return Engine(device=device, dtype="float32")


def load_base_model(model: str | None, config: str | None, device: str = "cpu") -> Any:
    """A model through the engine, exactly as generation would load it (families, shipped configs)."""
    from .evaluate import with_demo_config

    model, config = with_demo_config(model, config)
    engine = _engine(device)
    try:
        return engine.load_model(model, config=config)
    finally:
        engine.close(wait=False)


def require_training_extras() -> None:
    """LoRA training runs on peft and accelerate, which plain `pip install sdcore` does not bring."""
    import importlib.util

    missing = [name for name in ("peft", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise click.ClickException(f"`sdcore train lora` needs {' and '.join(missing)}: "
                                   "pip install 'sdcore[train]' (or pip install peft accelerate).")


def native_resolution(components: Any) -> int:
    factor = 2 ** (len(components.vae.config.block_out_channels) - 1)
    return int(components.unet.config.sample_size) * factor


# --- train lora -----------------------------------------------------------------------------------------


def run_train_lora(*, model: str | None, config: str | None, data: str, rank: int, alpha: float | None, steps: int,
                   out: str, batch_size: int, lr: float, text_encoder_lr: float | None, unet_only: bool,
                   resolution: int | None, sample_every: int, sample_prompts: tuple[str, ...],
                   checkpoint_every: int, resume: str | None, work_dir: str | None, seed: int, device: str,
                   quiet: bool, mixed_precision: str = "no") -> Path:
    from .common import ImageFolder, seed_everything
    from .lora import LoraSettings, LoraTrainer
    from .train import components_from_model

    require_training_extras()
    seed_everything(seed)
    base = load_base_model(model, config, device)
    components = components_from_model(base)
    size = resolution or native_resolution(components)
    dataset = ImageFolder.load(data, size, progress=not quiet)
    settings = LoraSettings(
        rank=rank, alpha=float(alpha if alpha is not None else rank), steps=steps, batch_size=batch_size, lr=lr,
        text_encoder_lr=text_encoder_lr, train_text_encoder=not unet_only, resolution=size,
        sample_every=sample_every, sample_prompts=tuple(sample_prompts), checkpoint_every=checkpoint_every, seed=seed,
        mixed_precision=mixed_precision,
    )
    work = Path(work_dir) if work_dir else Path(out).with_name(Path(out).stem + "-training")
    trainer = LoraTrainer(components, dataset, settings, work, progress=not quiet)
    try:
        if resume:
            trainer.resume(resume)
            if not quiet:
                click.echo(f"Resuming from step {trainer.step} of {steps}.", err=True)
        trainer.train()
        path = trainer.save(out, {"ss_sd_model_name": base.name, "ss_num_train_images": str(len(dataset)),
                                  "ss_resolution": f"({size}, {size})"})
    finally:
        trainer.close()
    if not quiet:
        click.echo(f"Loss curve: {work / 'loss.png'}", err=True)
    return path


# --- train full -----------------------------------------------------------------------------------------


def save_single_file(components: Any, out: str | Path, *, dtype: torch.dtype = torch.float16,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write the model as one `.safetensors` in the original LDM key layout, through the model family's writer
    (a diffusers folder is written to a temporary place and loaded back by the engine)."""
    from safetensors.torch import save_file

    from sdcore.tokenizers import save_clip_tokenizer

    from .train import demo_configs

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sdcore-export-") as tmp:
        folder = Path(tmp) / "model"
        components.unet.save_pretrained(folder / "unet", safe_serialization=True)
        components.vae.save_pretrained(folder / "vae", safe_serialization=True)
        components.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
        (folder / "scheduler").mkdir(parents=True, exist_ok=True)
        (folder / "scheduler" / "scheduler_config.json").write_text(
            json.dumps(components.scheduler_config, indent=2), encoding="utf-8")
        index = (components.configs or demo_configs())["model_index"]
        (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        save_clip_tokenizer(folder / "tokenizer")
        engine = _engine("cpu")
        try:
            model = engine.load_model(str(folder))
            state = model.to_single_file_state_dict()
            meta = dict(getattr(model, "single_file_metadata", lambda: {})())
        finally:
            engine.close(wait=False)
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in state.items()}
    meta.update(metadata or {})
    save_file(state, str(out), metadata=meta)
    out.chmod(0o644)
    return out


def run_train_full(*, data: str, out: str, config: str | None, model: str | None, demo_architecture: bool,
                   vae_steps: int | None, vae_batch_size: int, steps: int, batch_size: int, lr: float, warmup: int,
                   ema_decay: float, caption_dropout: float, unet_only: bool, sample_every: int,
                   pyramid_noise: float = 0.0, high_noise_weight: float = 0.0, pure_noise_fraction: float = 0.0,
                   pure_noise_loss: str = "image", grounding_weight: float = 0.0, grounding_words: str = "",
                   sample_prompts: tuple[str, ...], checkpoint_every: int, resume: str | None, work_dir: str | None,
                   save_config: str | None, seed: int, quiet: bool) -> Path:
    from .common import ImageFolder, load_checkpoint, seed_everything
    from .train import (
        DEFAULT_SAMPLE_PROMPTS,
        DiffusionSettings,
        DiffusionTrainer,
        VaeSettings,
        build_components,
        components_from_model,
        demo_configs,
        read_config_folder,
        train_vae,
        write_config_folder,
    )

    # with --model, --config is the config folder to load it with (as for `train lora`)
    if sum(bool(x) for x in (config and not model, model, demo_architecture)) != 1:
        raise click.UsageError("Give exactly one of --config (from scratch), --demo-architecture or --model "
                               "(with --config to load it with).")
    seed_everything(seed)
    work = Path(work_dir) if work_dir else Path(out).with_name(Path(out).stem + "-training")
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if model:
        from .evaluate import with_demo_config

        _, config = with_demo_config(model, config)  # the folder it loads with (the demo model's, if it is that)
        components = components_from_model(load_base_model(model, config))
        vae_steps = vae_steps or 0
    else:
        configs = demo_configs() if demo_architecture else read_config_folder(config)  # type: ignore[arg-type]
        components = build_components(configs, seed=seed)
        vae_steps = 300 if vae_steps is None else vae_steps
    size = native_resolution(components)
    dataset = ImageFolder.load(data, size, progress=not quiet)
    state = load_checkpoint(resume) if resume else None
    if state is not None and "vae" in state:
        components.vae.load_state_dict(state["vae"])
        components.vae.register_to_config(scaling_factor=float(state["vae_scaling_factor"]))
        components.vae.eval().requires_grad_(False)
    elif vae_steps > 0:
        train_vae(components.vae, dataset, VaeSettings(steps=vae_steps, batch_size=vae_batch_size, seed=seed),
                  work_dir=work, progress=not quiet)
        if not quiet:
            click.echo(f"VAE trained ({time.time() - started:.0f} s); reconstructions: "
                       f"{work / 'vae_reconstruction.png'}", err=True)
    settings = DiffusionSettings(
        steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, ema_decay=ema_decay,
        caption_dropout=caption_dropout, train_text_encoder=not unet_only, sample_every=sample_every,
        pyramid_noise=pyramid_noise, high_noise_weight=high_noise_weight, pure_noise_fraction=pure_noise_fraction,
        pure_noise_loss=pure_noise_loss, grounding_weight=grounding_weight,
        grounding_words=tuple(w.strip() for w in grounding_words.split(",") if w.strip()),
        sample_prompts=tuple(sample_prompts) or DEFAULT_SAMPLE_PROMPTS, checkpoint_every=checkpoint_every, seed=seed,
    )
    trainer = DiffusionTrainer(components, dataset, settings, work, progress=not quiet)
    if state is not None:
        trainer.load_state(state)
        if not quiet:
            click.echo(f"Resuming from step {trainer.step} of {steps}.", err=True)
    elif vae_steps > 0:
        trainer.save_checkpoint()  # the trained VAE is kept even if stage 2 is interrupted at once
    trainer.train()
    trainer.use_ema()
    meta = {"sdcore_training": json.dumps({"steps": steps, "batch_size": batch_size, "vae_steps": vae_steps,
                                           "images": len(dataset), "seconds": round(time.time() - started)})}
    path = save_single_file(components, out, metadata=meta)
    if save_config or components.configs is not None:
        configs = dict(components.configs or {})
        if configs:
            configs["vae"] = {**configs["vae"], "scaling_factor": float(components.vae.config.scaling_factor)}
            target = Path(save_config) if save_config else work / "config"
            write_config_folder(target, configs, tokenizer=False)
            if not quiet:
                click.echo(f"Config folder: {target}", err=True)
        elif save_config and model:
            # a fine-tuned checkpoint keeps its architecture: the config folder it was loaded with goes along
            if config is None:
                click.echo(f"{model} loads without a config folder; none written to {save_config}.", err=True)
            elif Path(config).resolve() != Path(save_config).resolve():
                copy_tree(Path(config), Path(save_config))
    if not quiet:
        click.echo(f"Done in {time.time() - started:.0f} s. Loss curve: {work / 'loss.png'}", err=True)
    return path


# --- the demo -------------------------------------------------------------------------------------------


# What trained the shipped model, in two stages. Stage 1 learns colour, shape, size and background but not
# position (a small UNet reads the layout from the noise); stage 2 fine-tunes it with token grounding
# (grounding.py), which teaches position. Grounding from the start (weight 0.25) learnt position (99%) but not
# colour or shape; pyramid noise, high-noise weights and pure-noise samples made it worse (docs/demo-model.md).
DEMO_RECIPE: dict[str, Any] = {
    "count": 30000,  # images of shapes
    "vae_steps": 100,
    "vae_batch_size": 16,
    "steps": 3200,
    "batch_size": 64,
    "lr": 1e-3,
    "warmup": 200,
    "grounding_steps": 1200,  # stage 2
    "grounding_lr": 5e-4,
    "grounding_warmup": 50,
    "grounding_weight": 0.1,
    "grounding_words": "circle,square,triangle,star,left,right,top,bottom,centre,center,middle,"
                       "red,orange,yellow,green,blue,purple",
    "lora_count": 1500,  # night-sky images for the LoRA
    "lora_steps": 400,
    "lora_rank": 4,
    "lora_alpha": 4.0,
    "lora_batch_size": 16,
    "lora_lr": 2e-3,
    "seed": 0,
}


def run_demo_train(*, work_dir: str, out: str | None, count: int | None, vae_steps: int | None, steps: int | None,
                   lora_steps: int | None, skip_lora: bool, resume: bool, quiet: bool,
                   grounding_steps: int | None = None) -> None:
    from sdcore.demo import DEMO_CONFIG_DIR, DEMO_LORA_FILE, DEMO_MODEL_FILE

    from .data import write_dataset

    recipe = dict(DEMO_RECIPE)
    for key, value in (("count", count), ("vae_steps", vae_steps), ("steps", steps), ("lora_steps", lora_steps),
                       ("grounding_steps", grounding_steps)):
        if value is not None:
            recipe[key] = value
    work = Path(work_dir)
    model_file = Path(out) if out else DEMO_MODEL_FILE
    config_dir = model_file.parent / "config" if out else DEMO_CONFIG_DIR
    started = time.time()
    shapes = work / "shapes"
    if not (shapes / f"{recipe['count'] - 1:06d}.mask.png").is_file():  # data from before masks: draw it again
        write_dataset(shapes, recipe["count"], recipe["seed"], progress=not quiet)
    common = dict(data=str(shapes), batch_size=recipe["batch_size"], ema_decay=0.999, caption_dropout=0.1,
                  unet_only=False, sample_every=400, sample_prompts=(), checkpoint_every=200, seed=recipe["seed"],
                  vae_batch_size=recipe["vae_batch_size"], quiet=quiet)
    base_file, base_config = work / "base" / "model.safetensors", work / "base" / "config"
    checkpoint = work / "model" / "checkpoint.pt"
    if not (resume and base_file.is_file()):
        run_train_full(
            out=str(base_file), config=None, model=None, demo_architecture=True, vae_steps=recipe["vae_steps"],
            steps=recipe["steps"], lr=recipe["lr"], warmup=recipe["warmup"],
            resume=str(checkpoint) if resume and checkpoint.is_file() else None, work_dir=str(work / "model"),
            save_config=str(base_config), **common,
        )
    checkpoint = work / "grounding" / "checkpoint.pt"
    run_train_full(
        out=str(model_file), config=str(base_config), model=str(base_file), demo_architecture=False, vae_steps=0,
        steps=recipe["grounding_steps"], lr=recipe["grounding_lr"], warmup=recipe["grounding_warmup"],
        grounding_weight=recipe["grounding_weight"], grounding_words=recipe["grounding_words"],
        resume=str(checkpoint) if resume and checkpoint.is_file() else None, work_dir=str(work / "grounding"),
        save_config=str(config_dir), **common,
    )
    if not quiet:
        click.echo(f"Demo model: {model_file} ({model_file.stat().st_size / 1e6:.1f} MB, "
                   f"{time.time() - started:.0f} s so far)", err=True)
    if skip_lora:
        return
    night = work / "night"
    if not (night / f"{recipe['lora_count'] - 1:06d}.txt").is_file():
        write_dataset(night, recipe["lora_count"], recipe["seed"] + 7, night=True, progress=not quiet)
    lora_file = model_file.parent / "loras" / DEMO_LORA_FILE.name if out else DEMO_LORA_FILE
    lora_file.parent.mkdir(parents=True, exist_ok=True)
    run_train_lora(
        model=str(model_file), config=str(config_dir), data=str(night), rank=recipe["lora_rank"],
        alpha=recipe["lora_alpha"], steps=recipe["lora_steps"], out=str(lora_file),
        batch_size=recipe["lora_batch_size"], lr=recipe["lora_lr"], text_encoder_lr=None, unet_only=False,
        resolution=None, sample_every=100, sample_prompts=("a red circle at the top left on a night background",
                                                           "a large yellow star in the centre on a night background"),
        checkpoint_every=100, resume=None, work_dir=str(work / "lora"), seed=recipe["seed"], device="cpu",
        quiet=quiet,
    )
    if not quiet:
        click.echo(f"Demo LoRA: {lora_file}. Total {time.time() - started:.0f} s.", err=True)


def copy_tree(src: Path, dest: Path) -> None:
    shutil.copytree(src, dest, dirs_exist_ok=True)
