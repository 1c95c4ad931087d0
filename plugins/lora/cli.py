"""`sdcore loras` and `sdcore merge`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


def parse_lora_arg(text: str) -> tuple[str, float]:
    """`FILE:WEIGHT` (weight optional, default 1); a Windows drive letter `C:` is not taken for a weight."""
    name, sep, weight = text.rpartition(":")
    if sep and name and len(name) > 1:
        try:
            return name, float(weight)
        except ValueError:
            pass
    return text, 1.0


def merge_loras(engine: Any, model_name: str, loras: list[tuple[str, float]], out: Path,
                config: str | None = None) -> Path:
    """Bake `loras` (name or path, weight) into `model_name` and write an LDM-layout single-file checkpoint."""
    from safetensors.torch import save_file

    from sdcore.errors import InvalidRequest

    from . import patch
    from .library import find_lora, load_lora

    if out.suffix.lower() != ".safetensors":
        raise InvalidRequest(f"--out must be a .safetensors file, not {out}.")
    model = engine.load_model(model_name, config=config)
    resolved = [patch.resolve(model, load_lora(find_lora(name, engine)), w, w) for name, w in loras]
    with model.lock:
        try:
            patch.apply(model, resolved)
            state = {k: v.detach().contiguous() for k, v in model.to_single_file_state_dict().items()}
        finally:
            patch.restore(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"sdcore_merged_loras": json.dumps([[Path(n).stem, w] for n, w in loras])}
    save_file(state, str(out), metadata=metadata)
    return out


@click.command("merge")
@click.option("--model", required=True, help="Base checkpoint (.safetensors) or diffusers folder.")
@click.option("--config", help="Diffusers config folder for a non-standard architecture.")
@click.option("--lora", "loras", multiple=True, required=True, metavar="FILE:WEIGHT",
              help="A LoRA name or path and its weight (default 1); repeat for several.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .safetensors file.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help="Precision the model is loaded and written in.")
def merge_command(model: str, config: str | None, loras: tuple[str, ...], out: str, dtype: str) -> None:
    """Bake LoRAs into a single-file checkpoint in the original LDM key layout."""
    from sdcore.engine import Engine

    parsed = [parse_lora_arg(item) for item in loras]
    engine = Engine(device="cpu", dtype=dtype, load_entrypoints=True)
    try:
        path = merge_loras(engine, model, parsed, Path(out), config=config)
    finally:
        engine.close()
    click.echo(f"Wrote {path}")


@click.command("loras")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def loras_command(as_json: bool) -> None:
    """List the LoRAs found in the LoRA folders (name, family, kind, rank, hash)."""
    from .library import available, describe, lora_dirs

    items = [describe(path) for path in available()]
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    if not items:
        click.echo("No LoRAs found in: " + ", ".join(str(d) for d in lora_dirs()))
        return
    for item in items:
        if "error" in item:
            click.echo(f"{item['name']}\tERROR: {item['error']}")
            continue
        click.echo(
            f"{item['name']}\t{item['family'] or '?'}\t{'/'.join(item['kinds'])}\trank {item['rank'] or '-'}"
            f"\t{item['hash']}\t{item['path']}"
        )
