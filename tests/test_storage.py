"""Model sources (shoal/fleet/storage.py) against a real S3 server: moto's server mode on 127.0.0.1.

moto has no request counter (../shared/dependency-notes.md), so the server here is moto's own WSGI app
(moto.server.DomainDispatcherApplication, what ThreadedMotoServer runs) wrapped in a middleware that
counts GETs per path and can slow the weights down (to make two fetches overlap, or to kill one midway).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from shoal.fleet.storage import MANIFEST, SourceError, cache_entry, is_network_path, resolve_source

try:
    from server_fixture import REPO, TINY_MODEL, launch_own_server, wait_ready
except ImportError:  # tests/ became a package
    from tests.server_fixture import REPO, TINY_MODEL, launch_own_server, wait_ready  # type: ignore[no-redef]

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
from werkzeug.serving import make_server  # noqa: E402 - moto[server] brings werkzeug

BUCKET = "models"
PREFIX = "stories260K"
WEIGHTS = f"/{BUCKET}/{PREFIX}/model.safetensors"


class CountingS3:
    """moto's S3 as WSGI, counting GETs per path; `slow_s` delays each GET of the weights."""

    def __init__(self) -> None:
        self.app = moto_server.DomainDispatcherApplication(moto_server.create_backend_app)
        self.gets: Counter[str] = Counter()
        self.slow_s = 0.0

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if environ["REQUEST_METHOD"] == "GET":
            self.gets[path] += 1
            if path == WEIGHTS and self.slow_s:
                time.sleep(self.slow_s)
        return self.app(environ, start_response)


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 holding stories260K under s3://models/stories260K."""
    import s3fs

    app = CountingS3()
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",  # a region_name in client_kwargs breaks bucket creation
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(BUCKET)
    fs.put(str(TINY_MODEL) + "/", f"{BUCKET}/{PREFIX}/", recursive=True)
    app.env = env
    yield app
    server.shutdown()
    thread.join(5)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _same_files(a: Path, b: Path) -> None:
    for f in a.iterdir():
        assert _digest(b / f.name) == _digest(f), f.name


def _completion(url: str) -> str:
    body = {"model": "stories", "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _serve_from_s3(name: str, cache: Path, s3) -> str:
    server = launch_own_server(
        name,
        ["--model", f"s3://{BUCKET}/{PREFIX}", "--served-model-name", "stories"],
        {**s3.env, "SHOAL_MODEL_CACHE": str(cache)},
    )
    try:
        wait_ready(server)
        return _completion(server.url)
    finally:
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(15)


@pytest.mark.timeout(90)
def test_serve_from_s3_then_warm_start_makes_no_get(s3, tmp_path):
    s3.gets.clear()
    first = _serve_from_s3("s3-cold", tmp_path, s3)
    assert s3.gets[WEIGHTS] == 1, s3.gets
    entry = cache_entry(f"s3://{BUCKET}/{PREFIX}", tmp_path)
    _same_files(TINY_MODEL, entry)
    s3.gets.clear()
    assert _serve_from_s3("s3-warm", tmp_path, s3) == first
    assert sum(s3.gets.values()) == 0, f"a warm start reached S3: {s3.gets}"


@pytest.mark.timeout(30)
def test_corrupted_cached_file_is_fetched_again(s3, tmp_path):
    source = f"s3://{BUCKET}/{PREFIX}"
    entry = resolve_source(source, tmp_path)
    weights = entry / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    weights.write_bytes(bytes(data))
    s3.gets.clear()
    assert resolve_source(source, tmp_path) == entry
    assert s3.gets[WEIGHTS] == 1, s3.gets
    assert s3.gets[f"/{BUCKET}/{PREFIX}/tokenizer.json"] == 0, "an intact file was fetched again"
    assert _digest(weights) == _digest(TINY_MODEL / "model.safetensors")


def _fetch_in_subprocess(source: str, cache: Path, env: dict) -> subprocess.Popen:
    code = "import sys; from shoal.fleet.storage import resolve_source; print(resolve_source(*sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, source, str(cache)],
        env={**os.environ, **env, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.timeout(60)
def test_two_concurrent_fetches_copy_once(s3, tmp_path):
    source = f"s3://{BUCKET}/{PREFIX}"
    s3.gets.clear()
    s3.slow_s = 1.5  # the first copy is still running when the second process asks
    try:
        procs = [_fetch_in_subprocess(source, tmp_path, s3.env) for _ in range(2)]
        outs = [p.communicate(timeout=50) for p in procs]
    finally:
        s3.slow_s = 0.0
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0] == outs[1][0] == f"{cache_entry(source, tmp_path)}\n"
    assert s3.gets[WEIGHTS] == 1, s3.gets


@pytest.mark.timeout(60)
def test_crashed_fetch_leaves_no_complete_looking_model(s3, tmp_path):
    source = f"s3://{BUCKET}/{PREFIX}"
    s3.gets.clear()
    s3.slow_s = 5.0
    try:
        proc = _fetch_in_subprocess(source, tmp_path, s3.env)
        deadline = time.monotonic() + 30
        while s3.gets[WEIGHTS] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.kill()  # mid-copy: SIGKILL, no cleanup runs
        proc.wait(10)
    finally:
        s3.slow_s = 0.0
    entry = cache_entry(source, tmp_path)
    assert not entry.exists()
    assert list(tmp_path.glob(entry.name + ".tmp-*")), "the fetch was not under way when killed"
    assert resolve_source(source, tmp_path) == entry
    assert (entry / MANIFEST).exists() and not list(tmp_path.glob(entry.name + ".tmp-*"))
    _same_files(TINY_MODEL, entry)


@pytest.mark.timeout(20)
def test_file_share_is_copied_and_local_directory_served_in_place(tmp_path):
    cache = tmp_path / "cache"
    entry = resolve_source(TINY_MODEL.resolve().as_uri(), cache)
    assert entry.parent == cache and (entry / MANIFEST).exists()
    _same_files(TINY_MODEL, entry)
    assert resolve_source(str(TINY_MODEL), cache) == TINY_MODEL


@pytest.mark.timeout(60)
def test_unreachable_storage_fails_naming_the_source(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_MAX_ATTEMPTS": "1", "SHOAL_MODEL_CACHE": str(tmp_path)}  # fmt: skip
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SourceError, match="s3://nowhere/model"):
        resolve_source("s3://nowhere/model", tmp_path)
    assert not any(tmp_path.glob("*.tmp-*"))
    server = launch_own_server("s3-unreachable", ["--model", "s3://nowhere/model"], env)
    assert server.proc.wait(45) == 1
    assert "shoal serve: error: s3://nowhere/model: cannot list" in server.log_tail()


def test_network_mounts_are_recognised():
    mounts = (
        "/dev/sda1 / ext4 rw 0 0\n"
        "server:/export /mnt/models nfs4 rw 0 0\n"
        "/dev/sdb1 /mnt/models/local ext4 rw 0 0\n"
    )
    assert is_network_path(Path("/mnt/models/llama"), mounts)
    assert not is_network_path(Path("/mnt/models/local/llama"), mounts)
    assert not is_network_path(Path("/home/me/llama"), mounts)
