"""The policy file: validated at start, and a bad field is named by its path."""

from __future__ import annotations

import subprocess
import sys

import pytest

from shoal.policy.config import PolicyError, load_policy

pytestmark = pytest.mark.timeout(60)


def test_a_valid_policy_loads(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(
        "classes:\n  premium: {priority: 0}\n  standard: {priority: 10}\ndefault_class: standard\n"
    )
    policy = load_policy(path)
    assert policy.priority_of("premium") == 0 and policy.priority_of(None) == 10
    assert load_policy(_write(tmp_path, "")).classes == {}  # an empty file: everything off


def _write(tmp_path, text: str):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("classes:\n  premium: {priority: fast}\n", "classes.premium.priority"),
        ("classes:\n  premium: {priority: 0, weight: 2}\n", "classes.premium.weight"),
        ("rate_limit: {}\n", "rate_limit"),
        ("classes: {a: {priority: 1}}\ndefault_class: b\n", "default_class 'b' is not one of classes"),
        ("classes: [\n", "not valid YAML"),
        ("- a\n- b\n", "a mapping at the top level"),
    ],
)
def test_a_bad_policy_names_the_file_and_the_field(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(PolicyError, match="p.yaml") as err:
        load_policy(path)
    assert message in str(err.value)


def test_serve_stops_at_start_on_a_bad_policy(tmp_path):
    path = _write(tmp_path, "classes:\n  premium: {priority: fast}\n")
    out = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "serve", "--model", str(tmp_path), "--policy", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "classes.premium.priority" in out.stderr, out.stderr[-2000:]


def test_the_documented_example_policy_is_valid():
    """docs/security.md's complete example must load as written."""
    import re
    from pathlib import Path

    import yaml

    from shoal.policy.config import PolicyConfig

    doc = (Path(__file__).resolve().parents[1] / "docs" / "security.md").read_text()
    example = re.search(r"## Example\n\n```yaml\n(.*?)```", doc, re.S).group(1)
    policy = PolicyConfig.model_validate(yaml.safe_load(example))
    assert policy.response_cache is not None and policy.content_filter is not None
