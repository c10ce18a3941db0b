"""Acceptance 7: the audit log's HMAC chain verifies, and `shoal audit verify` names the first bad line
after an edit, an insertion, a deletion, a reordering or a truncation (plain and AES-GCM encrypted)."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shoal.cli import app as shoal_cli
from shoal.policy.audit import AuditLog, LineCipher, head_path_for

pytestmark = pytest.mark.timeout(30)

KEY = "an audit key of at least thirty-two bytes"
AES_KEY = base64.b64encode(os.urandom(32)).decode()
LINES = 6


def write_log(path: Path, n: int = LINES, cipher: LineCipher | None = None) -> Path:
    log = AuditLog(path, head_path_for(path), KEY.encode(), cipher)
    for i in range(n):
        log.append({"request_id": f"req-{i}", "status": 200, "tenant": "t", "prompt_tokens": i})
    return path


def run_verify(path: Path, encrypted: bool = False) -> tuple[int, str]:
    env = {"SHOAL_AUDIT_KEY": KEY, "SHOAL_AUDIT_ENCRYPTION_KEY": AES_KEY if encrypted else ""}
    out = CliRunner().invoke(shoal_cli, ["audit", "verify", str(path)], env=env)
    return out.exit_code, out.output


def rewrite(path: Path, change) -> None:
    lines = path.read_text().splitlines()
    path.write_text("".join(line + "\n" for line in change(lines)))


def edit_status(line: str) -> str:
    entry = json.loads(line)
    entry["status"] = 500
    return json.dumps(entry, sort_keys=True, separators=(",", ":"))


def test_an_untouched_log_verifies(tmp_path):
    code, output = run_verify(write_log(tmp_path / "audit.log"))
    assert code == 0 and f"OK, {LINES} lines" in output, output


@pytest.mark.parametrize(
    ("tamper", "named"),
    [
        (lambda ls: [*ls[:2], edit_status(ls[2]), *ls[3:]], "line 3: MAC mismatch"),
        (lambda ls: [*ls[:2], *ls[3:]], "line 3: sequence number 4, expected 3"),
        (lambda ls: [*ls[:3], ls[1], *ls[3:]], "line 4: sequence number 2, expected 4"),
        (lambda ls: [ls[0], ls[2], ls[1], *ls[3:]], "line 2: sequence number 3, expected 2"),
        (lambda ls: ls[:-2], "line 5: missing"),
        (lambda ls: [*ls[:-1], ls[-1][:20]], "line 6: unreadable"),
    ],
    ids=["edit", "delete", "insert", "reorder", "truncate", "cut-mid-line"],
)
def test_tampering_is_named_by_its_first_bad_line(tmp_path, tamper, named):
    path = write_log(tmp_path / "audit.log")
    rewrite(path, tamper)
    code, output = run_verify(path)
    assert code == 1 and named in output, output


def test_a_consistent_forgery_still_fails_without_the_key(tmp_path):
    """Renumbering after a deletion fixes the sequence but not the MACs: the chain still breaks there."""
    path = write_log(tmp_path / "audit.log")

    def renumber(lines: list[str]) -> list[str]:
        kept = [json.loads(line) for i, line in enumerate(lines) if i != 2]
        for seq, entry in enumerate(kept, start=1):
            entry["seq"] = seq
        return [json.dumps(e) for e in kept]

    rewrite(path, renumber)
    code, output = run_verify(path)
    assert code == 1 and "line 3: MAC mismatch" in output, output


def test_a_restarted_log_continues_the_chain(tmp_path):
    path = write_log(tmp_path / "audit.log", 3)
    write_log(path, 2)  # a new AuditLog over the same file, as after a server restart
    code, output = run_verify(path)
    assert code == 0 and "OK, 5 lines" in output, output


def test_encrypted_lines_hide_the_record_and_still_verify(tmp_path):
    path = write_log(tmp_path / "audit.log", cipher=LineCipher(base64.b64decode(AES_KEY)))
    text = path.read_text()
    assert "req-1" not in text and all(line.startswith("enc:") for line in text.splitlines())
    assert run_verify(path, encrypted=True)[0] == 0
    assert run_verify(path, encrypted=False)[0] == 1  # without the key nothing can be checked
    rewrite(path, lambda ls: [*ls[:1], ls[1][:-4] + "AAA=", *ls[2:]])  # flip the GCM tag
    code, output = run_verify(path, encrypted=True)
    assert code == 1 and "line 2: unreadable" in output, output


def test_verify_refuses_a_short_key(tmp_path):
    path = write_log(tmp_path / "audit.log", 1)
    out = CliRunner().invoke(shoal_cli, ["audit", "verify", str(path)], env={"SHOAL_AUDIT_KEY": "short"})
    assert out.exit_code == 2 and "at least 32 bytes" in out.output
