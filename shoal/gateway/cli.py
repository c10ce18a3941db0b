"""`shoal gateway --config gateway.yaml` runs the gateway; `shoal gateway switch` flips a blue-green model
through the admin endpoint. Imports no torch: the gateway runs on a box without it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

gateway_app = typer.Typer(
    help="The gateway: routing, blue-green, canary and shadow in front of shoal (or OpenAI-compatible) servers.",
    add_completion=False,
)


@gateway_app.callback(invoke_without_command=True)
def gateway(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option(help="gateway.yaml (see docs/fleet.md).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = 8080,
    upstream_timeout: Annotated[
        float | None, typer.Option(help="Seconds a backend has to answer before a 504 (overrides the file).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "warning",
) -> None:
    """Run the gateway (with --config), or a subcommand."""
    if ctx.invoked_subcommand is not None:
        return
    if config is None:
        typer.echo("shoal gateway: error: --config gateway.yaml is required", err=True)
        raise typer.Exit(2)
    from shoal.gateway.config import ConfigError, load_config

    try:
        cfg = load_config(config)
        if upstream_timeout is not None:  # validated like the file's own value
            cfg.gateway = cfg.gateway.model_validate(
                cfg.gateway.model_dump() | {"upstream_timeout_s": upstream_timeout}
            )
    except (ConfigError, ValueError) as e:
        typer.echo(f"shoal gateway: error: {e}", err=True)
        raise typer.Exit(2) from None
    import uvicorn

    from shoal.gateway.app import build_app

    uvicorn.run(build_app(cfg), host=host, port=port, log_level=log_level, access_log=False)


@gateway_app.command()
def switch(
    model: Annotated[str, typer.Option(help="The model to switch.")],
    to: Annotated[str, typer.Option(help="The version that takes all traffic.")],
    url: Annotated[str, typer.Option(help="The gateway's URL.")] = "http://127.0.0.1:8080",
    admin_token: Annotated[str | None, typer.Option(envvar="SHOAL_GATEWAY_ADMIN_TOKEN")] = None,
) -> None:
    """Blue-green: send all new traffic of MODEL to version TO, at once (run again to switch back)."""
    import httpx

    headers = {"authorization": f"Bearer {admin_token}"} if admin_token else {}
    try:
        resp = httpx.post(
            f"{url}/admin/models/{model}/switch", json={"version": to}, headers=headers, timeout=10
        )
    except httpx.HTTPError as e:
        typer.echo(f"shoal gateway switch: error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(resp.text)
    if resp.status_code != 200:
        sys.exit(1)
