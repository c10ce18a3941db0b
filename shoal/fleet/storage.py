"""Model sources: a local directory, a Hugging Face Hub id, or shared storage copied into a local cache.

Shared storage is anything fsspec opens (https://filesystem-spec.readthedocs.io/): `s3://bucket/prefix`
through s3fs, `gs://` through gcsfs, `file:///mnt/share/model`, and a plain path on a network mount
(NFS, SMB, ...). Such a model is copied once into `<cache>/<sha256 of the source>/`:
- only the files a model needs (shoal.model.hub.MODEL_FILE_PATTERNS);
- each file's size checked against the listing, its SHA-256 computed while it streams, both kept in a
  manifest (`.shoal-manifest.json`) that is written last;
- into a temporary directory renamed into place, so a crashed copy never looks complete (the same
  download-then-rename scheme as huggingface_hub's `.incomplete` files);
- under a `filelock.FileLock` per source, so two processes fetching one model copy it once;
- a cached copy is re-hashed at every start: a file whose checksum no longer matches is fetched again.
A cached source is taken as immutable: a warm start never contacts the storage (it starts while the
storage is down, and makes no request to it). Publish a new version under a new prefix.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from shoal.model.hub import MODEL_FILE_PATTERNS, resolve_model_path

log = logging.getLogger(__name__)

CACHE_ENV = "SHOAL_MODEL_CACHE"
MANIFEST = ".shoal-manifest.json"
CHUNK = 8 * 1024 * 1024
LOCK_TIMEOUT_S = 3600  # another process copying a large model: wait for it rather than copy twice
# Filesystem types (/proc/mounts) whose paths are copied to the local cache: a model served from a
# network mount would page its weights over the network, at every start and every page-out.
NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "glusterfs", "ceph", "lustre"}


class SourceError(OSError):
    """A model source that cannot be listed, read or verified; the message names the source."""


@dataclass(frozen=True)
class RemoteFile:
    path: str  # as the filesystem names it
    rel: str  # relative to the source root, the name inside the cache entry
    size: int


def default_cache_dir() -> Path:
    """$SHOAL_MODEL_CACHE, else ~/.cache/shoal/models (XDG_CACHE_HOME honoured)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "shoal" / "models"


def resolve_source(source: str, cache_dir: Path | None = None) -> Path:
    """The local model directory for `source`: a local directory as is, a Hub id through huggingface_hub,
    shared storage (URL with a protocol, or a path on a network mount) copied into the cache."""
    if not is_shared_source(source):
        return resolve_model_path(source)
    return fetch(source, Path(cache_dir) if cache_dir else default_cache_dir())


def is_shared_source(source: str) -> bool:
    """A URL with a protocol (s3://, gs://, file://...) or a path on a network mount: copied to the cache."""
    return "://" in source or is_network_path(Path(source).expanduser())


def is_network_path(path: Path, mounts: str | None = None) -> bool:
    """Whether `path` lies on a network filesystem, by the longest matching mount point in /proc/mounts
    (proc(5)); False where there is no /proc (the path is then served in place)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return False
    target = str(path.resolve()) if path.exists() else str(path)
    best, best_type = "", ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, best_type = point, fields[2]
    return best_type in NETWORK_FS


def cache_entry(source: str, cache_dir: Path) -> Path:
    """One directory per source string: the first 16 hex digits of its SHA-256."""
    return cache_dir / hashlib.sha256(source.rstrip("/").encode()).hexdigest()[:16]


def fetch(source: str, cache_dir: Path) -> Path:
    """Copy `source` into its cache entry unless a verified copy is there; returns the entry."""
    from filelock import FileLock

    entry = cache_entry(source, cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry) + ".lock", timeout=LOCK_TIMEOUT_S):
        _remove_stale_temps(entry)
        bad = _verify(entry)
        if bad == []:
            log.info("model %s: cache hit at %s (checksums verified)", source, entry)
            return entry
        if bad is not None:
            log.warning("model %s: cached %s fail their checksums: fetching them again", source, bad)
            _refetch(source, entry, bad)
            return entry
        _copy_atomically(source, entry)
    return entry


def _verify(entry: Path) -> list[str] | None:
    """None if the entry is not a complete copy (no manifest); else the files that fail size or SHA-256."""
    manifest = _read_manifest(entry)
    if manifest is None:
        return None
    bad = []
    for rel, want in manifest["files"].items():
        f = entry / rel
        if not f.is_file() or f.stat().st_size != want["size"] or _sha256(f) != want["sha256"]:
            bad.append(rel)
    return bad


def _read_manifest(entry: Path) -> dict | None:
    try:
        return json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _copy_atomically(source: str, entry: Path) -> None:
    """Copy into a temporary sibling, write the manifest last, then rename it to the entry."""
    fs, root = _open_fs(source)
    files = _list(fs, root, source)
    _check_free_space(entry.parent, sum(f.size for f in files), source)
    tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".tmp-", dir=entry.parent))
    try:
        digests = _download(fs, files, tmp, source)
        _write_manifest(tmp, source, files, digests)
        if entry.exists():  # a leftover without a manifest (e.g. copied by hand): replaced
            shutil.rmtree(entry)
        os.rename(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("model %s: copied %d files into %s", source, len(files), entry)


def _check_free_space(cache_dir: Path, needed: int, source: str) -> None:
    """Fail before copying, not on a full disk halfway through."""
    free = shutil.disk_usage(cache_dir).free
    if free < needed:
        raise SourceError(
            f"{source}: needs {needed / 1e9:.2f} GB, only {free / 1e9:.2f} GB free in the cache {cache_dir}"
        )


def _refetch(source: str, entry: Path, bad: list[str]) -> None:
    """Fetch the named files again, each into a temporary file renamed over the corrupted one."""
    fs, root = _open_fs(source)
    wanted = {f.rel: f for f in _list(fs, root, source)}
    manifest = _read_manifest(entry) or {"files": {}}
    missing = [rel for rel in bad if rel not in wanted]
    if missing:
        raise SourceError(f"{source}: {missing} no longer exist in the source")
    tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".tmp-", dir=entry.parent))
    try:
        digests = _download(fs, [wanted[rel] for rel in bad], tmp, source)
        for rel in bad:
            os.replace(tmp / rel, entry / rel)
            manifest["files"][rel] = {"size": wanted[rel].size, "sha256": digests[rel]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _write_json(entry / MANIFEST, manifest)


def _open_fs(source: str):
    """fsspec filesystem and root path for a URL; a bare path (a network mount) is a local one."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(source if "://" in source else Path(source).expanduser().as_uri())
    except ImportError as e:  # s3fs/gcsfs not installed: say which extra to install
        raise SourceError(f"{source}: {e} (pip install 'shoal[storage]' for s3://)") from e
    except ValueError as e:
        raise SourceError(f"{source}: unsupported source ({e})") from e


def _list(fs, root: str, source: str) -> list[RemoteFile]:
    """The model files under root, with their sizes; SourceError if the storage cannot be listed."""
    try:
        found = fs.find(root, detail=True)
    except Exception as e:  # noqa: BLE001 - network, credentials, no bucket: one clear message
        raise SourceError(f"{source}: cannot list the model's files ({type(e).__name__}: {e})") from e
    base = root.rstrip("/") + "/"
    files = [
        RemoteFile(path, path[len(base) :], int(info.get("size") or 0))
        for path, info in sorted(found.items())
        if info.get("type") == "file"
        and any(fnmatch.fnmatch(path.rsplit("/", 1)[-1], p) for p in MODEL_FILE_PATTERNS)
    ]
    unsafe = [f.rel for f in files if f.rel.startswith("/") or ".." in f.rel.split("/")]
    if unsafe:  # a key like a/../../x would be written outside the cache entry
        raise SourceError(f"{source}: refusing file names that leave the model directory: {unsafe}")
    if not any(f.rel.endswith(".safetensors") for f in files):
        raise SourceError(f"{source}: no *.safetensors model files there (found {len(found)} entries)")
    return files


def _download(fs, files: list[RemoteFile], dest: Path, source: str) -> dict[str, str]:
    """Stream every file into dest, hashing as it goes; checks each size. Returns rel -> SHA-256."""
    from tqdm import tqdm

    digests = {}
    total = sum(f.size for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"fetching {source}", file=sys.stderr) as bar:
        for f in files:
            digests[f.rel] = _download_one(fs, f, dest / f.rel, source, bar)
    return digests


def _download_one(fs, f: RemoteFile, target: Path, source: str, bar) -> str:
    target.parent.mkdir(parents=True, exist_ok=True)
    h, size = hashlib.sha256(), 0
    try:
        with fs.open(f.path, "rb", block_size=CHUNK) as src, open(target, "wb") as out:
            while block := src.read(CHUNK):
                h.update(block)
                out.write(block)
                size += len(block)
                bar.update(len(block))
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"{source}: cannot read {f.rel} ({type(e).__name__}: {e})") from e
    if size != f.size:
        raise SourceError(f"{source}: {f.rel} is {size} bytes, the listing said {f.size}")
    return h.hexdigest()


def _write_manifest(dest: Path, source: str, files: list[RemoteFile], digests: dict[str, str]) -> None:
    manifest = {
        "source": source,
        "files": {f.rel: {"size": f.size, "sha256": digests[f.rel]} for f in files},
    }
    _write_json(dest / MANIFEST, manifest)


def _write_json(path: Path, value: dict) -> None:
    """Write then rename: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def _remove_stale_temps(entry: Path) -> None:
    """Temporary copies left by a crashed fetch (we hold the lock, so none is in progress)."""
    for stale in entry.parent.glob(entry.name + ".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
