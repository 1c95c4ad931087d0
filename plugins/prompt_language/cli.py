"""`sdcore prompt parse` and `sdcore prompt tokens`: the prompt language for front ends and scripts."""

from __future__ import annotations

import json
from typing import Any

import click

from sdcore.errors import PromptError


def _fail(error: PromptError, prompt: str) -> None:
    """Print the error with a caret under the position, then exit 1."""
    lines = [f"Error: {error}"]
    if error.position is not None and "\n" not in prompt and len(prompt) <= 300:
        lines += ["  " + prompt, "  " + " " * error.position + "^"]
    click.echo("\n".join(lines), err=True)
    raise click.exceptions.Exit(1)


@click.group(name="prompt")
def prompt_group() -> None:
    """Read prompts in the A1111 prompt language."""


@prompt_group.command("parse")
@click.argument("prompt")
@click.option("--steps", type=click.IntRange(min=1), required=True,
              help="Sampling steps the schedule covers (twice the UI steps for Heun, DPM2, DPM2 a, DPM++ SDE).")
@click.option("--hires-steps", type=click.IntRange(min=1), default=None,
              help="Parse for the hires-fix pass of this many steps (--steps is the first pass).")
@click.option("--negative", is_flag=True, help="Parse a negative prompt (no AND, no tags).")
@click.option("--old-timeline", is_flag=True, help="A1111's 'use old prompt editing timelines'.")
@click.option("--lenient", is_flag=True,
              help="Read prompts A1111 would silently misread the way A1111 does, instead of refusing them.")
@click.option("--compact", is_flag=True, help="One line of JSON.")
def parse_command(prompt: str, steps: int, hires_steps: int | None, negative: bool, old_timeline: bool,
                  lenient: bool, compact: bool) -> None:
    """Print how PROMPT is read, as JSON: text without tags, extra networks, sub-prompts and schedules."""
    from . import parse

    try:
        parsed = parse(prompt, steps, hires_steps, negative=negative, use_old_timeline=old_timeline,
                       strict=not lenient)
    except PromptError as exc:
        _fail(exc, prompt)
        return
    click.echo(json.dumps(parsed, ensure_ascii=False, indent=None if compact else 2))


@prompt_group.command("tokens")
@click.argument("prompt")
@click.option("--model", default=None, help="Count with this model's textual-inversion embeddings.")
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True,
              help="Steps for prompt editing (the longest scheduled text is counted).")
@click.option("--negative", is_flag=True, help="Count a negative prompt (no AND, no tags).")
@click.option("--emphasis", type=click.Choice(["Original", "No norm", "Ignore", "None"]), default="Original",
              show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of per-chunk counts.")
def tokens_command(prompt: str, model: str | None, steps: int, negative: bool, emphasis: str,
                   as_json: bool) -> None:
    """Print the token count of each 75-token chunk of PROMPT, as UIs show it ("42/75")."""
    from . import count_tokens

    loaded: Any = None
    engine = None
    if model is not None:
        from sdcore import Engine

        engine = Engine(device="cpu")
        loaded = engine.load_model(model)
    try:
        counts = count_tokens(prompt, loaded, steps=steps, negative=negative, emphasis=emphasis)  # type: ignore[arg-type]
    except PromptError as exc:
        _fail(exc, prompt)
        return
    finally:
        if engine is not None:
            engine.close(wait=False)
    if as_json:
        click.echo(json.dumps(counts))
    else:
        for count in counts:
            click.echo(f"{count}/75")


def add_commands(cli: click.Group) -> None:
    cli.add_command(prompt_group)
