"""`--load-format mmap` (shoal/model/loader.py, SplitLinear): weights stay in the safetensors mapping.

Two real `shoal serve` processes on SmolLM2-135M-Instruct (bfloat16 checkpoint), default and mmap, started
together, engine in a thread so that /proc/PID/status is the engine's: same greedy tokens, and less
anonymous resident memory (RssAnon: the mapping's pages are file-backed, RssFile) after load.
"""

from __future__ import annotations

import re
import signal

import httpx
import pytest
import torch

from shoal.model.device import mmap_dtype

try:
    from server_fixture import MODELS, launch_own_server, wait_ready
except ImportError:  # tests/ became a package
    from tests.server_fixture import MODELS, launch_own_server, wait_ready  # type: ignore[no-redef]

SMOLLM2 = MODELS / "SmolLM2-135M-Instruct"


def _rss_anon_mib(pid: int) -> float:
    status = open(f"/proc/{pid}/status").read()
    return int(re.search(r"RssAnon:\s+(\d+) kB", status).group(1)) / 1024


def _greedy(url: str) -> list[str]:
    body = {"model": "m", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0,
            "logprobs": 0, "ignore_eos": True}  # fmt: skip
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


@pytest.mark.timeout(120)
def test_mmap_serves_same_greedy_tokens_with_less_anonymous_memory():
    if not SMOLLM2.exists():
        pytest.skip(f"{SMOLLM2} missing")
    common = ["--model", str(SMOLLM2), "--dtype", "auto", "--served-model-name", "m", "--engine-mode",
              "thread", "--max-model-len", "256", "--kv-cache-memory", str(16 << 20)]  # fmt: skip
    servers = {
        fmt: launch_own_server(f"load-{fmt}", [*common, "--load-format", fmt]) for fmt in ("auto", "mmap")
    }
    try:
        for server in servers.values():
            wait_ready(server)
        anon = {fmt: _rss_anon_mib(s.proc.pid) for fmt, s in servers.items()}
        tokens = {fmt: _greedy(s.url) for fmt, s in servers.items()}
    finally:
        for server in servers.values():
            server.proc.send_signal(signal.SIGTERM)
        for server in servers.values():
            server.proc.wait(15)
    assert tokens["mmap"] == tokens["auto"]
    # 269 MB of bfloat16 weights: the default copies the fused and packed ones into anonymous memory.
    assert anon["mmap"] < anon["auto"] - 100, anon


def test_mmap_keeps_the_checkpoint_dtype_and_says_when_it_is_slow():
    cpu = torch.device("cpu")
    assert mmap_dtype("auto", "float32", cpu) == (torch.float32, None)
    dtype, warning = mmap_dtype("auto", "float16", cpu)
    assert dtype == torch.float16 and "float16 on CPU runs" in warning
    with pytest.raises(ValueError, match="checkpoint's dtype"):
        mmap_dtype("float32", "bfloat16", cpu)
    with pytest.raises(ValueError, match="for CPU"):
        mmap_dtype("auto", "bfloat16", torch.device("cuda"))
