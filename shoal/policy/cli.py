"""`shoal keys create|list|revoke` and `shoal audit verify`: thin commands over keys.py and audit.py."""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Annotated

import typer

from shoal.policy import audit, keys

keys_app = typer.Typer(no_args_is_help=True, add_completion=False)
audit_app = typer.Typer(no_args_is_help=True, add_completion=False)

KeyFile = Annotated[
    Path, typer.Option("--file", envvar="SHOAL_KEYS_FILE", help="The key file (policy: auth.keys_file).")
]


@keys_app.command("create")
def create(
    file: KeyFile,
    tenant: Annotated[str | None, typer.Option(help="Tenant: limits, cache isolation, audit.")] = None,
    priority_class: Annotated[
        str | None, typer.Option("--class", help="Priority class (a name from the policy's classes).")
    ] = None,
    rpm: Annotated[int | None, typer.Option(min=1, help="This key's requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option(min=1, help="This key's tokens per minute.")] = None,
) -> None:
    """Create a key and print it, once: only its SHA-256 is stored."""
    limits = keys.KeyLimits(requests_per_minute=rpm, tokens_per_minute=tpm)
    record, key = keys.create_key(file, tenant, priority_class, limits)
    typer.echo(f"id: {record.id}")
    typer.echo(f"key: {key}")
    typer.echo("Store the key now: it is not shown again.", err=True)


@keys_app.command("list")
def list_keys(file: KeyFile) -> None:
    """The keys of the file (ids and settings; secrets are not stored)."""
    typer.echo("id            tenant        class       rpm     tpm       created              revoked")
    for r in keys.read_keys(file):
        revoked = _when(r.revoked) if r.revoked else "-"
        typer.echo(
            f"{r.id:<13} {r.tenant or '-':<13} {r.priority_class or '-':<11} "
            f"{r.limits.requests_per_minute or '-':<7} {r.limits.tokens_per_minute or '-':<9} "
            f"{_when(r.created):<20} {revoked}"
        )


@keys_app.command("revoke")
def revoke(key_id: Annotated[str, typer.Argument(help="The key's id.")], file: KeyFile) -> None:
    """Revoke a key: a running server refuses it from its next request on."""
    try:
        keys.revoke_key(file, key_id)
    except KeyError as e:
        typer.echo(f"shoal keys revoke: {e.args[0]}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"revoked {key_id}")


def _when(unix: float) -> str:
    return datetime.datetime.fromtimestamp(unix, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


@audit_app.command("verify")
def verify(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="The audit log.")],
    head: Annotated[Path | None, typer.Option(help="The head file (default: FILE.head).")] = None,
    key_env: Annotated[str, typer.Option(help="Variable holding the HMAC key.")] = "SHOAL_AUDIT_KEY",
    encryption_key_env: Annotated[
        str, typer.Option(help="Variable holding the AES-GCM key (used when set).")
    ] = "SHOAL_AUDIT_ENCRYPTION_KEY",
) -> None:
    """Check the HMAC chain and the head file; exit 1 naming the first bad line."""
    try:
        key = audit.hmac_key_from_env(key_env)
        cipher = audit.LineCipher.from_env(encryption_key_env) if os.environ.get(encryption_key_env) else None
    except audit.AuditKeyError as e:
        typer.echo(f"shoal audit verify: {e}", err=True)
        raise typer.Exit(2) from None
    result = audit.verify(file, key, head, cipher)
    if not result.ok:
        typer.echo(f"{file}: {result.problem}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{file}: OK, {result.lines} lines, chain and head verified")
