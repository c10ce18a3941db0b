"""The model registry: `shoal serve --models models.yaml`, one entry per model, validated at start.

```yaml
models:
  - name: stories
    version: v1
    source: models/stories260K       # a local directory or a hub id (remote: shoal/fleet/storage.py)
    dtype: float32                   # or quantization: ... (names of shoal/quant)
    memory: 64MiB                    # weights + KV cache; the KV cache gets what the weights leave
    priority: 0                      # higher wins the LRU tie-break (kept longer)
    fallback: [stories-small]        # tried in order when this one cannot answer
    keep_alive: 300                  # seconds idle before unloading (Ollama's keep_alive); -1: never
    pinned: false                    # never unloaded (neither by keep-alive nor by LRU)
    preload: true                    # loaded at start (the pod's main model)
```

A client names a model `name` (its first listed version) or `name@version` (pinned), as the gateway does.
Errors name the entry (`models[1] (stories@v2): fallback 'x' is not a registered model`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shoal.policy.config import validation_problems

_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
DEFAULT_KEEP_ALIVE_S = 300.0  # Ollama's default keep_alive is 5 minutes


def parse_bytes(value: int | str) -> int:
    """64MiB, 1.5GiB, 500MB or a plain number of bytes."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", value)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {value!r} (e.g. 512MiB, 2GiB, 1000000)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


class ModelEntry(BaseModel):
    """One registered model (see the module docstring for the fields)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, pattern=r"^[^@\s]+$")
    version: str | None = Field(default=None, pattern=r"^[^@\s]+$")
    source: str = Field(min_length=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # EngineConfig's
    quantization: str | None = None
    memory: int | None = None  # bytes, weights + KV cache; None: weights x 2 + DEFAULT_KV_BYTES
    priority: int = 0
    fallback: list[str] = Field(default_factory=list)
    keep_alive: float = DEFAULT_KEEP_ALIVE_S  # seconds; < 0 never unloads for idleness
    pinned: bool = False
    preload: bool = False

    @field_validator("memory", mode="before")
    @classmethod
    def _parse_memory(cls, value: int | str | None) -> int | None:
        return None if value is None else parse_bytes(value)

    @field_validator("source")
    @classmethod
    def _local_or_hub(cls, source: str) -> str:
        """An unknown model fails at start: a local path must exist; anything else must read as a hub id
        (org/name) or a URL that shoal/fleet/storage.py resolves."""
        if "://" in source or _HUB_ID.fullmatch(source) or Path(source).expanduser().is_dir():
            return source
        raise ValueError(f"unknown model: {source!r} is neither a local model directory nor a hub id")

    @property
    def ref(self) -> str:
        """What clients send and responses carry: name@version, or name for an unversioned entry."""
        return f"{self.name}@{self.version}" if self.version else self.name


class Registry:
    """The entries in file order, looked up by `name` (first version) or `name@version`."""

    def __init__(self, entries: list[ModelEntry]):
        self.entries = entries
        self._by_ref: dict[str, ModelEntry] = {}
        for entry in reversed(entries):  # the first version of a name wins the bare name
            self._by_ref[entry.name] = entry
        for entry in entries:
            self._by_ref[entry.ref] = entry

    def lookup(self, model: str) -> ModelEntry | None:
        return self._by_ref.get(model)

    def chain(self, entry: ModelEntry) -> list[ModelEntry]:
        """The entry, then its fallbacks in order (each once; validation made them all exist)."""
        out = [entry]
        for ref in entry.fallback:
            fallback = self._by_ref[ref]
            if fallback not in out:
                out.append(fallback)
        return out


def load_registry(path: Path) -> Registry:
    """Parse and validate models.yaml; ValueError naming the file and entry on any problem."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: {e}") from None
    items = raw.get("models") if isinstance(raw, dict) else None
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: expected a non-empty list under 'models:'")
    entries = [_entry(path, i, item) for i, item in enumerate(items)]
    _check_unique(path, entries)
    registry = Registry(entries)
    for i, entry in enumerate(entries):
        for ref in entry.fallback:
            if registry.lookup(ref) is None:
                raise ValueError(
                    f"{path}: models[{i}] ({entry.ref}): fallback {ref!r} is not a registered model"
                )
    return registry


def _entry(path: Path, i: int, item: object) -> ModelEntry:
    label = item.get("name", "?") if isinstance(item, dict) else "?"
    try:
        return ModelEntry.model_validate(item)
    except ValidationError as e:
        raise ValueError(f"{path}: models[{i}] ({label}): {validation_problems(e)}") from None


def _check_unique(path: Path, entries: list[ModelEntry]) -> None:
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        if entry.ref in seen:
            raise ValueError(f"{path}: models[{i}] ({entry.ref}): registered twice")
        seen.add(entry.ref)
