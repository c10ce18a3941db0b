"""The audit log: one append-only JSON line per request, chained with HMAC-SHA256 (RFC 2104).

Each line is a JSON object: the record (time, request id, key id and tenant, never a credential;
model, status, token counts, latency, the SHA-256 of prompt and output) plus `seq` (its 1-based line
number) and `mac` = HMAC(key, previous line's mac || canonical JSON of the rest). The first line chains
from 64 zeros. Editing, inserting, deleting or reordering a line breaks the chain at that line. Cutting
lines off the end keeps the chain intact, so the latest `seq` and `mac` are also written to a head file
(`<log>.head`), which `verify` compares with the last line.

The HMAC key comes from an environment variable (`key_env`, at least 32 bytes). With `encrypt`, every
line is stored as `enc:` + base64(nonce || AES-256-GCM ciphertext) under a second key from the
environment (`encryption_key_env`: 32 bytes, base64): the log stays append-only, one line per request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from shoal.policy.encryption import Cipher, EncryptionKeyError

GENESIS_MAC = "0" * 64
MIN_KEY_BYTES = 32
ENCRYPTED_PREFIX = "enc:"


class AuditPolicy(BaseModel):
    """`audit` in the policy file."""

    model_config = ConfigDict(extra="forbid")
    file: Path
    head_file: Path | None = None  # default: <file>.head
    key_env: str = "SHOAL_AUDIT_KEY"
    encrypt: bool = False
    encryption_key_env: str = "SHOAL_AUDIT_ENCRYPTION_KEY"
    include_text: bool = False  # also store prompt and output text (sensitive: consider `encrypt`)

    @property
    def head_path(self) -> Path:
        return self.head_file or head_path_for(self.file)


def head_path_for(log: Path) -> Path:
    return log.with_name(log.name + ".head")


class AuditKeyError(ValueError):
    """A key missing from the environment, or too short."""


def hmac_key_from_env(name: str) -> bytes:
    value = os.environ.get(name, "").encode()
    if len(value) < MIN_KEY_BYTES:
        raise AuditKeyError(f"the audit HMAC key: set {name} to a secret of at least {MIN_KEY_BYTES} bytes")
    return value


class LineCipher:
    """An audit line sealed with AES-256-GCM (policy/encryption.py), as `enc:` + base64 text."""

    def __init__(self, key: bytes):
        self._cipher = Cipher(key)

    @classmethod
    def from_env(cls, name: str) -> LineCipher:
        try:
            return cls(Cipher.key_from_env(name, "the audit encryption key"))
        except EncryptionKeyError as e:
            raise AuditKeyError(str(e)) from None

    def seal(self, line: str) -> str:
        return ENCRYPTED_PREFIX + base64.b64encode(self._cipher.seal(line.encode())).decode()

    def open(self, stored: str) -> str:
        return self._cipher.open(base64.b64decode(stored[len(ENCRYPTED_PREFIX) :])).decode()


def _canonical(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def chain_mac(key: bytes, previous_mac: str, record: dict[str, Any]) -> str:
    """HMAC-SHA256 over the previous line's MAC and this record's canonical JSON (without `mac`)."""
    message = previous_mac.encode() + b"\n" + _canonical(record).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


class AuditLog:
    """Appends chained lines; continues the chain of an existing file after a restart."""

    def __init__(self, path: Path, head: Path, key: bytes, cipher: LineCipher | None = None):
        self.path, self.head, self.key, self.cipher = Path(path), Path(head), key, cipher
        self._lock = threading.Lock()
        self.seq, self.mac = self._resume()

    @classmethod
    def from_policy(cls, policy: AuditPolicy) -> AuditLog:
        cipher = LineCipher.from_env(policy.encryption_key_env) if policy.encrypt else None
        return cls(policy.file, policy.head_path, hmac_key_from_env(policy.key_env), cipher)

    def _resume(self) -> tuple[int, str]:
        last = None
        for last in _lines(self.path):  # noqa: B007 - only the last one matters
            pass
        if last is None:
            return 0, GENESIS_MAC
        entry = json.loads(self.cipher.open(last) if self.cipher else last)
        return int(entry["seq"]), str(entry["mac"])

    def append(self, record: dict[str, Any]) -> None:
        """Write one line (flushed to the OS before returning), then the head file."""
        with self._lock:
            entry = {**record, "seq": self.seq + 1}
            mac = chain_mac(self.key, self.mac, entry)
            line = _canonical({**entry, "mac": mac})
            with open(self.path, "a", encoding="utf-8") as f:
                f.write((self.cipher.seal(line) if self.cipher else line) + "\n")
            self.seq, self.mac = entry["seq"], mac
            _write_head(self.head, self.seq, self.mac)


def _write_head(path: Path, seq: int, mac: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"seq": seq, "mac": mac}) + "\n")
    os.replace(tmp, path)  # atomic: a reader sees the old head or the new one


def _lines(path: Path) -> Iterator[str]:
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield line.rstrip("\n")


@dataclass
class VerifyResult:
    ok: bool
    lines: int
    problem: str | None = None  # names the first bad line
    bad_line: int | None = None


def verify(
    path: Path, key: bytes, head: Path | None = None, cipher: LineCipher | None = None
) -> VerifyResult:
    """Check the chain line by line, then the head file; the first problem is named with its line."""
    mac, n = GENESIS_MAC, 0
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, start=1):  # noqa: B007 - n is the count afterwards
            problem, entry = _check_line(raw.rstrip("\n"), n, mac, key, cipher)
            if problem is not None:
                return VerifyResult(False, n - 1, f"line {n}: {problem}", n)
            mac = entry["mac"]
    return _check_head(head or head_path_for(path), n, mac)


def _check_line(
    raw: str, n: int, previous: str, key: bytes, cipher: LineCipher | None
) -> tuple[str | None, dict[str, Any]]:
    try:
        text = cipher.open(raw) if cipher else raw
        entry = json.loads(text)
    except Exception as e:  # noqa: BLE001 - bad base64, failed GCM tag, bad JSON: all "unreadable"
        return f"unreadable ({type(e).__name__}: the line was altered or cut)", {}
    if not isinstance(entry, dict) or not isinstance(entry.get("mac"), str):
        return "not an audit record", {}
    if entry.get("seq") != n:
        return f"sequence number {entry.get('seq')}, expected {n} (a line deleted, inserted or moved)", {}
    record = {k: v for k, v in entry.items() if k != "mac"}
    if not hmac.compare_digest(chain_mac(key, previous, record), entry["mac"]):
        return "MAC mismatch (the line was edited, or the line before it is not its predecessor)", {}
    return None, entry


def _check_head(head: Path, lines: int, mac: str) -> VerifyResult:
    try:
        recorded = json.loads(head.read_text())
    except (OSError, ValueError) as e:
        return VerifyResult(False, lines, f"head file {head}: unreadable ({e})", None)
    if recorded.get("seq") != lines or not hmac.compare_digest(str(recorded.get("mac")), mac):
        return VerifyResult(
            False,
            lines,
            f"line {lines + 1}: missing: the log ends after line {lines} but the head file records "
            f"line {recorded.get('seq')} (the log was truncated, or the head file altered)",
            lines + 1,
        )
    return VerifyResult(True, lines)


def sha256_hex(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def request_record(ctx: Any, decode: Callable[[list[int]], str] | None = None) -> dict[str, Any]:
    """The audit record of one finished request, from the server's RequestContext (duck-typed: policy
    code does not import the server). Prompts are hashed as the token ids the model saw (after the chat
    template); with `decode` (the policy's include_text), the prompt and output texts are stored too."""
    identity = ctx.identity
    prompts = [out.prompt_token_ids for out in ctx.outputs]
    texts = [choice.text for out in ctx.outputs for choice in out.outputs]
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(ctx.arrival_unix_ns / 1e9, timezone.utc).isoformat(),
        "request_id": ctx.request_id,
        "method": ctx.method,
        "path": ctx.path,
        "key_id": getattr(identity, "key_id", None),
        "tenant": getattr(identity, "tenant", None),
        "model": ctx.model,
        "status": ctx.status,
        "error": ctx.error_kind,
        "auth_failure": ctx.auth_failure,
        "prompt_tokens": sum(len(p) for p in prompts),
        "completion_tokens": sum(len(c.token_ids) for out in ctx.outputs for c in out.outputs),
        "latency_s": round(ctx.latency, 6) if ctx.latency is not None else None,
        "cache_hit": bool(getattr(ctx, "cache_hit", False)),  # answered by the response cache
        "prompt_sha256": sha256_hex(json.dumps(prompts)) if prompts else None,
        "output_sha256": sha256_hex(json.dumps(texts, ensure_ascii=False)) if texts else None,
    }
    if decode is not None:
        record["prompt_text"] = [decode(p) for p in prompts]
        record["output_text"] = texts
    return record
