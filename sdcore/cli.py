"""The `sdcore` command line. Plugins add commands through the `register_commands` hook.

Errors print one line to stderr and exit with status 1 (2 for usage errors); `--debug` shows the traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import SdcoreError


class SdcoreGroup(click.Group):
    """Turns sdcore errors into one clear line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SdcoreError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(1)
        except (OSError, ValueError) as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(1)


@click.group(cls=SdcoreGroup)
@click.version_option(__version__, prog_name="sdcore")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """sdcore: Stable Diffusion from the command line."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    if debug:
        import logging

        logging.basicConfig(level=logging.INFO)


def _engine(**kwargs: Any) -> Any:
    from .engine import Engine

    return Engine(**kwargs)


def _progress_and_result(job: Any, quiet: bool = False) -> Any:
    from tqdm import tqdm

    from .jobs import ProgressEvent

    bar = None  # created at the first step, so a job that fails before it prints only its error
    try:
        for event in job.events():
            if isinstance(event, ProgressEvent) and not quiet:
                if bar is None:
                    bar = tqdm(total=event.total, unit="step", file=sys.stderr, dynamic_ncols=True,
                               desc="Generating")
                bar.total = event.total
                bar.n = event.step
                bar.refresh()
    finally:
        if bar is not None:
            bar.close()
    return job.result()


@cli.command()
@click.argument("prompt")
@click.option("--negative", "negative_prompt", default="", help="Negative prompt.")
@click.option("--model", help="Checkpoint (.safetensors), diffusers folder or hub id. Default: the demo model.")
@click.option("--config", help="Diffusers config folder for a non-standard architecture.")
@click.option("--vae", help="Separate VAE file or folder.")
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--cfg", "cfg_scale", type=float, default=7.0, show_default=True)
@click.option("--sampler", default="DPM++ 2M", show_default=True, help="See `sdcore samplers`.")
@click.option("--schedule", "schedule_type", default="Automatic", show_default=True)
@click.option("--seed", type=int, default=-1, show_default=True, help="-1 for random.")
@click.option("--subseed", type=int, default=-1, help="Variation seed.")
@click.option("--subseed-strength", type=float, default=0.0, help="Variation strength, 0..1.")
@click.option("-W", "--width", type=int, help="Default: the model's native size.")
@click.option("-H", "--height", type=int, help="Default: the model's native size.")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--batch-count", type=int, default=1, show_default=True)
@click.option("--clip-skip", type=int, default=1, show_default=True)
@click.option("--init-image", type=click.Path(dir_okay=False), help="img2img / inpaint source image.")
@click.option("--mask", type=click.Path(dir_okay=False), help="Inpaint mask (white = repaint).")
@click.option("--strength", "denoising_strength", type=float, default=0.75, show_default=True)
@click.option("--mask-blur", type=int, default=4, show_default=True)
@click.option("--only-masked", "inpaint_full_res", is_flag=True, help="Inpaint a crop around the mask.")
@click.option("--padding", "inpaint_full_res_padding", type=int, default=32, show_default=True)
@click.option("--option", "option_pairs", multiple=True, metavar="PLUGIN=JSON",
              help='Plugin options, e.g. --option \'lora={"loras": [["x", 0.8]]}\'.')
@click.option("--out", "out_dir", default="outputs", show_default=True, type=click.Path(file_okay=False))
@click.option("--device", help="cpu, cuda, mps. Default: the best available.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None)
@click.option("--allow-pickle", is_flag=True, help="Allow .ckpt/.pt checkpoints (loaded with weights_only).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def generate(prompt: str, out_dir: str, device: str | None, dtype: str | None, allow_pickle: bool,
             quiet: bool, option_pairs: tuple[str, ...], **fields: Any) -> None:
    """Generate images for PROMPT and write them as PNGs with A1111 metadata."""
    from .demo import demo_model_path

    fields["options"] = _parse_options(option_pairs)
    request = {k: v for k, v in fields.items() if v is not None}
    request["prompt"] = prompt
    engine = _engine(device=device, dtype=dtype or _default_dtype(device), allow_pickle=allow_pickle)
    if not request.get("model") and not engine.default_model:
        demo = demo_model_path()
        if demo is not None:
            click.echo(f"No model given: using the built-in demo model ({demo.name}).", err=True)
    try:
        job = engine.submit(request)
        result = _progress_and_result(job, quiet)
    finally:
        engine.close(wait=False)
    for path in result.save(out_dir):
        click.echo(str(path))


def _default_dtype(device: str | None) -> str:
    return "float32" if (device or "cpu").startswith("cpu") else "float16"


def _parse_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise click.UsageError(f"--option takes PLUGIN=JSON, got {pair!r}")
        try:
            options[name.strip()] = json.loads(value)
        except json.JSONDecodeError as exc:
            raise click.UsageError(f"--option {name}: invalid JSON ({exc})") from None
    return options


@cli.command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(image: str, as_json: bool) -> None:
    """Show the generation parameters stored in IMAGE."""
    from .infotext import parse_infotext, read_infotext

    text = read_infotext(Path(image))
    if text is None:
        raise SdcoreError(f"{image} has no generation parameters.")
    if as_json:
        parsed = parse_infotext(text)
        click.echo(json.dumps({"prompt": parsed.prompt, "negative_prompt": parsed.negative_prompt,
                               "params": parsed.params, "infotext": text}, ensure_ascii=False, indent=2))
    else:
        click.echo(text)


@cli.command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option("--model", help="Model to use instead of the one named in the image.")
@click.option("--config", help="Diffusers config folder.")
@click.option("--vae", help="Separate VAE.")
@click.option("--out", "out_dir", default="outputs", show_default=True, type=click.Path(file_okay=False))
@click.option("--device")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None)
@click.option("--quiet", is_flag=True)
def regenerate(image: str, model: str | None, config: str | None, vae: str | None, out_dir: str,
               device: str | None, dtype: str | None, quiet: bool) -> None:
    """Make IMAGE again from its stored parameters."""
    from .infotext import read_infotext
    from .metadata import request_from_infotext

    text = read_infotext(Path(image))
    if text is None:
        raise SdcoreError(f"{image} has no generation parameters to regenerate from.")
    engine = _engine(device=device, dtype=dtype or _default_dtype(device))
    try:
        request = request_from_infotext(text, engine=engine, model=model, config=config, vae=vae)
        if model is None and request.model:
            request = request.model_copy(update={"model": engine.resolve_model_location(request.model)})
        result = _progress_and_result(engine.submit(request), quiet)
    finally:
        engine.close(wait=False)
    for path in result.save(out_dir):
        click.echo(str(path))


@cli.group()
def infotext() -> None:
    """Read A1111 infotext."""


@infotext.command("parse")
def infotext_parse() -> None:
    """Parse infotext from standard input and print JSON {prompt, negative_prompt, params}."""
    from .infotext import parse_infotext

    parsed = parse_infotext(sys.stdin.read())
    click.echo(json.dumps({"prompt": parsed.prompt, "negative_prompt": parsed.negative_prompt,
                           "params": parsed.params}, ensure_ascii=False, indent=2))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins(as_json: bool) -> None:
    """List the loaded plugins."""
    from .plugins import make_plugin_manager, plugin_infos

    infos = plugin_infos(make_plugin_manager())
    if as_json:
        click.echo(json.dumps([i.to_dict() for i in infos], indent=2))
        return
    for i in infos:
        origin = "built-in" if i.builtin else "third-party"
        click.echo(f"{i.name} {i.version or ''} ({origin}): {', '.join(i.hooks)}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def samplers(as_json: bool) -> None:
    """List the sampler names and schedule types."""
    engine = _engine(device="cpu")
    described = engine.samplers.describe()
    if as_json:
        click.echo(json.dumps(described, indent=2))
        return
    for entry in described:
        click.echo(f"{entry['name']}: {', '.join(entry['schedule_types'])}")


@cli.command()
def schema() -> None:
    """Print the JSON schema of a generation request (with plugin options)."""
    engine = _engine(device="cpu")
    click.echo(json.dumps(engine.request_schema(), indent=2))


def _add_plugin_commands() -> None:
    from .plugins import make_plugin_manager

    try:
        pm = make_plugin_manager()
    except SdcoreError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    pm.hook.register_commands(cli=cli)


def main(argv: list[str] | None = None) -> None:
    _add_plugin_commands()
    cli.main(args=argv, prog_name="sdcore")


if __name__ == "__main__":
    main()
