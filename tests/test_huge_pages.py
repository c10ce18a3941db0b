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
from shoal.model.packed_linear import PackedLinear, pack_linears

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
    owners = [SimpleNamespace(t=torch.ones(3 << 20, dtype=torch.uint8)) for _ in range(3)]  # 9 MB
    huge_pages.gather(owners, "t")
    assert _anon_huge_kb(owners[0].t.data_ptr()) >= huge_pages.HUGE_PAGE // 1024


@pytest.mark.skipif(not huge_pages.enabled(), reason="huge_pages.gather moves tensors on Linux only")
def test_pack_linears_puts_every_panel_in_one_buffer_and_keeps_the_outputs() -> None:
    g = torch.Generator().manual_seed(1)
    model = torch.nn.Sequential(*(torch.nn.Linear(96, n) for n in (64, 200, 96))).float()
    for p in model.parameters():
        p.requires_grad_(False)
        p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(8, 96, generator=g)
    expected = model[0](x)
    pack_linears(model, available_ram=1 << 34)
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    panels = [m.panels for m in packed if m.panels is not None]
    if not panels:
        pytest.skip("no gemm panels on this machine (native kernels unavailable)")
    assert len({p.untyped_storage().data_ptr() for p in panels}) == 1
    torch.testing.assert_close(packed[0](x), expected, rtol=1e-5, atol=1e-4)
