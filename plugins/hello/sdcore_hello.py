"""An example sdcore plugin, the source of the plugin tutorial (docs/plugins.md).

It shows the three things most plugins do:
- register typed request options (they appear in `sdcore schema`, the bridge and the widgets);
- write a field into the PNG infotext and read it back, so `sdcore regenerate` keeps it;
- add a CLI command.
"""

from __future__ import annotations

from typing import Any

import click
from pydantic import BaseModel, Field

from sdcore import hookimpl


class HelloOptions(BaseModel):
    """Options of the hello plugin: who signs the image."""

    signature: str = Field("", max_length=100, description="A name recorded in the image's metadata.")

    def infotext(self) -> dict[str, str]:
        return {"Hello signature": self.signature} if self.signature else {}

    @classmethod
    def from_infotext(cls, params: dict[str, str]) -> HelloOptions | None:
        signature = params.get("Hello signature")
        return cls(signature=signature) if signature else None


@hookimpl
def register_request_options(register: Any) -> None:
    register("hello", HelloOptions)


@hookimpl
def register_commands(cli: click.Group) -> None:
    @cli.command()
    @click.argument("name", default="world")
    def hello(name: str) -> None:
        """Say hello (an example plugin command)."""
        click.echo(f"Hello, {name}, from an sdcore plugin!")
