"""sdcore's trainer: `sdcore train lora`, `sdcore train full`, and the demo model (`sdcore demo ...`).

This module only defines the commands; torch, diffusers and the training code are imported when a command runs.

    sdcore train lora --model M --data DIR --rank 8 --alpha 8 --steps 500 --out my-lora.safetensors
    sdcore train full --config CONFIG_DIR --data DIR --vae-steps 2000 --steps 5000 --out model.safetensors
    sdcore demo data --out DIR --count 30000          # the synthetic shapes data set
    sdcore demo train                                  # rebuilds the shipped demo model and LoRA
    sdcore demo evaluate [--lora FILE]                 # pixel-analysis accuracy + a grid PNG
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from sdcore.hookspecs import hookimpl


def _threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def _work_dir(work_dir: str | None, out: str) -> Path:
    if work_dir:
        return Path(work_dir)
    out_path = Path(out)
    return out_path.with_name(out_path.stem + "-training")


@click.group(name="train")
def train_group() -> None:
    """Train LoRAs and small models."""


@train_group.command("lora")
@click.option("--model", help="Base model (file, diffusers folder, name). Default: the demo model.")
@click.option("--config", help="Diffusers config folder for a non-standard architecture.")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder of images with same-named .txt captions.")
@click.option("--rank", type=int, default=4, show_default=True)
@click.option("--alpha", type=float, default=None, help="LoRA alpha (scale = alpha/rank). Default: the rank.")
@click.option("--steps", type=int, default=500, show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .safetensors (kohya layout).")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--text-encoder-lr", type=float, default=None, help="Default: --lr.")
@click.option("--unet-only", is_flag=True, help="Do not train the text encoder.")
@click.option("--resolution", type=int, default=None, help="Training size. Default: the model's native size.")
@click.option("--sample-every", type=int, default=0, show_default=True, help="Write sample images every K steps.")
@click.option("--sample-prompt", "sample_prompts", multiple=True, help="Prompt for the samples (repeatable).")
@click.option("--checkpoint-every", type=int, default=100, show_default=True)
@click.option("--resume", type=click.Path(exists=True, dir_okay=False), help="checkpoint.pt to continue from.")
@click.option("--work-dir", help="Samples, checkpoint and loss curve. Default: OUT's name + '-training'.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), default="no", show_default=True,
              help="accelerate's mixed precision (on a GPU).")
@click.option("--quiet", is_flag=True)
def train_lora(**kwargs: Any) -> None:
    """Train a LoRA on DATA and save it in kohya's layout (loads in A1111, ComfyUI, diffusers, sdcore)."""
    from .runner import run_train_lora

    _threads(kwargs.pop("threads"))
    out = run_train_lora(**kwargs)
    click.echo(str(out))


@train_group.command("full")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder of images with same-named .txt captions.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output single-file .safetensors.")
@click.option("--config", help="Architecture (diffusers config folder) to train from scratch; with --model, the "
              "config folder to load that checkpoint with.")
@click.option("--model", help="Checkpoint to continue training from.")
@click.option("--demo-architecture", is_flag=True, help="Train the demo model's architecture from scratch.")
@click.option("--vae-steps", type=int, default=None, help="Autoencoder steps first. Default: 300 from scratch, "
              "0 from a checkpoint.")
@click.option("--vae-batch-size", type=int, default=32, show_default=True)
@click.option("--steps", type=int, default=4000, show_default=True, help="UNet + text encoder steps.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--warmup", type=int, default=200, show_default=True)
@click.option("--ema-decay", type=float, default=0.999, show_default=True)
@click.option("--caption-dropout", type=float, default=0.1, show_default=True)
@click.option("--unet-only", is_flag=True, help="Keep the text encoder frozen.")
@click.option("--pyramid-noise", type=float, default=0.0, show_default=True,
              help="Multi-resolution training noise with this discount (0: plain noise + offset 0.05).")
@click.option("--high-noise-weight", type=float, default=0.0, show_default=True,
              help="Cap of the extra loss weight (1/SNR) of high-noise steps (0: off).")
@click.option("--pure-noise-fraction", type=float, default=0.0, show_default=True,
              help="Share of samples trained as a sampler's first step: pure noise at the last timestep.")
@click.option("--pure-noise-loss", type=click.Choice(["image", "epsilon"]), default="image", show_default=True,
              help="Their loss: the predicted image's error, or the ε error like the other samples.")
@click.option("--grounding-weight", type=float, default=0.0, show_default=True,
              help="Weight of the token-grounding loss on cross-attention (needs NAME.mask.png masks; 0: off).")
@click.option("--grounding-words", default="", help="Comma-separated caption words to ground on the mask "
              "(with --grounding-weight; the demo data's: its shapes and position words).")
@click.option("--sample-every", type=int, default=500, show_default=True)
@click.option("--sample-prompt", "sample_prompts", multiple=True, help="Prompt for the samples (repeatable).")
@click.option("--checkpoint-every", type=int, default=250, show_default=True)
@click.option("--resume", type=click.Path(exists=True, dir_okay=False), help="checkpoint.pt to continue from.")
@click.option("--work-dir", help="Samples, checkpoints, loss curves. Default: OUT's name + '-training'.")
@click.option("--save-config", type=click.Path(file_okay=False), help="Also write the config folder here.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--quiet", is_flag=True)
def train_full(**kwargs: Any) -> None:
    """Train all of a small SD 1.x-layout model (VAE, then UNet + text encoder) and save one LDM-layout file."""
    from .runner import run_train_full

    _threads(kwargs.pop("threads"))
    out = run_train_full(**kwargs)
    click.echo(str(out))


@click.group()
def demo() -> None:
    """The built-in demo model: its data, its training and its evaluation."""


@demo.command("data")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--count", type=int, default=30000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--night", is_flag=True, help="The demo LoRA's data: shapes on a night sky.")
def demo_data(out: str, count: int, seed: int, night: bool) -> None:
    """Write COUNT synthetic shape images with captions to OUT."""
    from .data import write_dataset

    click.echo(str(write_dataset(out, count, seed, night=night, progress=True)))


@demo.command("train")
@click.option("--work-dir", default="demo-training", show_default=True, type=click.Path(file_okay=False),
              help="Data, samples, checkpoints and loss curves go here.")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="Model file. Default: the package's sdcore/data/demo/sdcore-demo.safetensors.")
@click.option("--count", type=int, default=None, help="Images to draw (default in demo_recipe).")
@click.option("--vae-steps", type=int, default=None)
@click.option("--steps", type=int, default=None)
@click.option("--grounding-steps", type=int, default=None, help="Steps of stage 2 (token grounding).")
@click.option("--lora-steps", type=int, default=None)
@click.option("--skip-lora", is_flag=True)
@click.option("--resume", is_flag=True, help="Continue from the work dir's checkpoint.")
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--quiet", is_flag=True)
def demo_train(threads: int | None, **kwargs: Any) -> None:
    """Rebuild the demo model and its LoRA from nothing: data, VAE, UNet + text encoder, grounding, LoRA."""
    from .runner import run_demo_train

    _threads(threads)
    run_demo_train(**kwargs)


@demo.command("evaluate")
@click.option("--model", help="Default: the demo model.")
@click.option("--config", help="Diffusers config folder for the model.")
@click.option("--lora", "lora_path", type=click.Path(exists=True, dir_okay=False),
              help="Also measure with this LoRA (default: the shipped demo LoRA, if any).")
@click.option("--no-lora", is_flag=True, help="Skip the LoRA measurement.")
@click.option("--prompts", "prompt_count", type=int, default=48, show_default=True)
@click.option("--seeds", type=int, default=2, show_default=True)
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--cfg", type=float, default=7.0, show_default=True)
@click.option("--sampler", default="DPM++ 2M", show_default=True)
@click.option("--out", "out_dir", default="demo-evaluation", show_default=True, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON.")
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
def demo_evaluate(threads: int | None, **kwargs: Any) -> None:
    """Generate prompts × seeds and measure colour, shape, position, size and background by pixel analysis."""
    from .evaluate import run_evaluate_command

    _threads(threads)
    run_evaluate_command(**kwargs)


@hookimpl
def register_commands(cli: click.Group) -> None:
    cli.add_command(train_group)
    cli.add_command(demo)
