"""`sdcore embeddings`."""

from __future__ import annotations

import json

import click


@click.command("embeddings")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--model-dir", "model_dirs", multiple=True, type=click.Path(file_okay=False),
              help="Also search DIR/embeddings (repeatable).")
def embeddings_command(as_json: bool, model_dirs: tuple[str, ...]) -> None:
    """List the textual-inversion embeddings found in the embedding folders (name, vectors, width, hash)."""
    from .library import available, describe, embedding_dirs

    items = [describe(path) for path in available(extra=model_dirs).values()]
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    if not items:
        click.echo("No embeddings found in: " + ", ".join(str(d) for d in embedding_dirs(extra=model_dirs)))
        return
    for item in items:
        if "error" in item:
            click.echo(f"{item['name']}\tERROR: {item['error']}")
            continue
        width = item["width"]
        width_text = "+".join(f"{k} {v}" for k, v in width.items()) if isinstance(width, dict) else str(width)
        click.echo(f"{item['name']}\t{item['vectors']} vectors\t{item['family'] or '?'}\t{width_text}"
                   f"\t{item['hash']}\t{item['path']}")
