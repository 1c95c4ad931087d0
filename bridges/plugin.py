"""The bridge as an sdcore plugin: adds `sdcore serve` (entry point `bridge = "sdcore_bridges.plugin"`).

Importing this module is cheap: click only; the server, websockets and the engine load when `serve` runs.
"""

from __future__ import annotations

import click

from sdcore.hookspecs import hookimpl


@hookimpl
def register_commands(cli: click.Group) -> None:
    cli.add_command(serve)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback needs --token.")
@click.option("--port", type=int, default=7862, show_default=True, help="Websocket port (0 = any free port).")
@click.option("--token", envvar="SDCORE_TOKEN", default=None,
              help="Shared secret clients send in their hello (and A1111 clients as Bearer or Basic password). "
                   "Also read from $SDCORE_TOKEN.")
@click.option("--allow-origin", "allow_origins", multiple=True, metavar="ORIGIN",
              help="Browser Origin to accept (repeatable). Clients that send no Origin are always accepted.")
@click.option("--a1111-api", "a1111_api", is_flag=True, help="Also serve the A1111-compatible HTTP API.")
@click.option("--a1111-port", type=int, default=7860, show_default=True, help="Port of the A1111 HTTP API.")
@click.option("--model", "default_model", help="Default model (checkpoint, diffusers folder or hub id).")
@click.option("--model-dir", "model_dirs", multiple=True, type=click.Path(file_okay=False),
              help="Folder of models clients may choose from (repeatable).")
@click.option("--device", help="cpu, cuda, mps. Default: the best available.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None)
@click.option("--allow-paths", is_flag=True,
              help="Let clients name any model/VAE/config path on this machine (off: only listed models).")
def serve(host: str, port: int, token: str | None, allow_origins: tuple[str, ...], a1111_api: bool,
          a1111_port: int, default_model: str | None, model_dirs: tuple[str, ...], device: str | None,
          dtype: str | None, allow_paths: bool) -> None:
    """Serve the engine to editors and scripts over the sdcore bridge protocol (websocket)."""
    import asyncio
    import logging
    import sys

    from sdcore.engine import Engine

    from .server import BridgeConfigError, BridgeServer, is_loopback

    if token is None and not is_loopback(host):
        raise click.UsageError(f"--host {host} is not loopback: pass --token (or set SDCORE_TOKEN) as well.")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Python-heavy denoising steps hold the GIL; a shorter switch interval (default 5 ms) lets the server's
    # loop deliver events within about a millisecond (benchmarks/bench_bridge.py)
    sys.setswitchinterval(0.001)
    if dtype is None:
        dtype = "float32" if (device or "cpu").startswith("cpu") else "float16"
    engine = Engine(device=device, dtype=dtype, default_model=default_model, model_dirs=model_dirs)
    try:
        server = BridgeServer(engine, host=host, port=port, token=token, allowed_origins=allow_origins,
                              a1111_port=a1111_port if a1111_api else None, allow_paths=allow_paths)
    except BridgeConfigError as exc:
        raise click.UsageError(str(exc)) from None

    async def main() -> None:
        await server.start()
        click.echo(f"sdcore bridge: {server.url}" + (" (token required)" if token else " (loopback only)"),
                   err=True)
        if server.http_url:
            click.echo(f"A1111-compatible API: {server.http_url}/sdapi/v1/", err=True)
        try:
            await server.serve_forever()
        finally:
            await server.close()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    finally:
        engine.close(wait=False)

