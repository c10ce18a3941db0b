"""Packed weights moved into one buffer on transparent huge pages (shoal/model/huge_pages.py)."""

from __future__ import annotations

import re
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from shoal.model import huge_pages
from shoal.model.loader import load_model
from shoal.model.packed_linear import PackedLinear
from shoal.quant.calibration import forward_windows
from shoal.quant.linear import QuantizedLinear
from shoal.quant.quantize import quantize_model

pytestmark = pytest.mark.timeout(60)
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_mode() -> str | None:
    """The THP mode in brackets ("always", "madvise", "never"), or None where the file is absent."""
    if not THP.exists():
        return None
    found = re.search(r"\[(\w+)\]", THP.read_text())
    return found.group(1) if found else None


def _owners(seed: int = 0) -> list[SimpleNamespace]:
    g = torch.Generator().manual_seed(seed)
    shapes = [((3, 7, 16), torch.float32), ((5, 289, 32, 2), torch.bfloat16), ((1,), torch.bfloat16)]
    shapes += [((700, 1024), torch.float32)]  # 2.8 MB: the buffer spans more than one huge page
    return [SimpleNamespace(t=torch.randn(*s, generator=g).to(d)) for s, d in shapes]


def _anon_huge_kb(address: int) -> int:
    """AnonHugePages of the mapping of this process that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        span = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            inside = int(span.group(1), 16) <= address < int(span.group(2), 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(not huge_pages.enabled(), reason="huge_pages.gather moves tensors on Linux only")
def test_gather_moves_every_tensor_into_one_aligned_buffer_with_the_same_values() -> None:
    owners = _owners()
    before = [o.t.clone() for o in owners]
    gone = [weakref.ref(o.t) for o in owners]
    huge_pages.gather(owners, "t")
    storages = {o.t.untyped_storage().data_ptr() for o in owners}
    assert len(storages) == 1  # one buffer
    for o, b in zip(owners, before, strict=True):
        assert o.t.dtype == b.dtype and o.t.shape == b.shape and o.t.is_contiguous()
        assert torch.equal(o.t, b)
        assert o.t.data_ptr() % huge_pages.ALIGN == 0
    assert owners[0].t.data_ptr() % huge_pages.HUGE_PAGE == 0  # the buffer starts on a huge page
    assert all(ref() is None for ref in gone)  # each original freed once replaced


def test_gather_refuses_a_tensor_off_the_cpu_before_moving_anything(monkeypatch) -> None:
    monkeypatch.setattr(huge_pages, "enabled", lambda: True)
    owners = [SimpleNamespace(t=torch.ones(4)), SimpleNamespace(t=torch.empty(4, device="meta"))]
    first = owners[0].t
    with pytest.raises(ValueError, match="CPU"):
        huge_pages.gather(owners, "t")
    assert owners[0].t is first


def test_shoal_huge_pages_0_leaves_the_tensors_where_they_are(monkeypatch) -> None:
    monkeypatch.setenv("SHOAL_HUGE_PAGES", "0")
    owners = _owners()
    originals = [o.t for o in owners]
    huge_pages.gather(owners, "t")
    assert all(o.t is t for o, t in zip(owners, originals, strict=True))


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or _thp_mode() in (None, "never"),
    reason=f"transparent huge pages are off here ({THP}: {_thp_mode()})",
)
def test_the_buffer_is_backed_by_huge_pages() -> None:
    # as a model load does: large blocks touched and freed, which raises glibc's mmap threshold, so that
    # torch.empty would serve the next ones from pages already faulted in (small ones, whatever the advice)
    for _ in range(3):
        torch.ones(24 << 20, dtype=torch.uint8)
    owners = [SimpleNamespace(t=torch.ones(3 << 20, dtype=torch.uint8)) for _ in range(3)]  # 9 MB
    huge_pages.gather(owners, "t")
    assert _anon_huge_kb(owners[0].t.data_ptr()) >= huge_pages.HUGE_PAGE // 1024


@pytest.mark.skipif(not huge_pages.enabled(), reason="huge_pages.gather moves tensors on Linux only")
@pytest.mark.parametrize("quantized", [False, True])
def test_a_loaded_model_streams_its_weights_from_one_buffer_with_the_same_logits(
    quantized: bool, stories_dir, tmp_path, monkeypatch
) -> None:
    """load_model moves every PackedLinear's panels (and a quantized model's packed integers) into one
    buffer each; the logits equal those of the same model loaded with SHOAL_HUGE_PAGES=0."""
    model_dir = stories_dir
    if quantized:
        model_dir = quantize_model(stories_dir, tmp_path / "w8", "rtn", 8, "auto").output
    monkeypatch.setenv("SHOAL_HUGE_PAGES", "0")
    plain, _ = load_model(Path(model_dir), torch.float32, torch.device("cpu"))
    monkeypatch.setenv("SHOAL_HUGE_PAGES", "1")
    model, _ = load_model(Path(model_dir), torch.float32, torch.device("cpu"))
    panels = [m.panels for m in model.modules() if isinstance(m, PackedLinear) and m.panels is not None]
    if not panels:
        pytest.skip("no gemm panels on this machine (native kernels unavailable)")
    assert len({p.untyped_storage().data_ptr() for p in panels}) == 1
    quantized_linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert bool(quantized_linears) == quantized
    for kind in ("weight_packed", "weight_int8"):  # each kind of stored integers in one buffer of its own
        stored = [getattr(m, kind) for m in quantized_linears if getattr(m, kind) is not None]
        assert len({t.untyped_storage().data_ptr() for t in stored}) <= 1
    assert any(m.weight_packed is not None for m in quantized_linears) == quantized
    # two windows of 39 tokens (batched linears, lm_head panels), one of 3 (decode-sized rows)
    for ids in (torch.arange(1, 79).view(2, 39), torch.tensor([[5, 9, 2]])):
        assert torch.equal(_logits(model, ids), _logits(plain, ids))


def _logits(model, token_ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.lm_head(forward_windows(model, token_ids))
