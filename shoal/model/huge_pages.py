"""Packed weights gathered into one buffer advised for transparent huge pages (THP).

Why: a decode step streams every packed weight once (270 MB a token for SmolLM2-135M in bfloat16). On 4 KB
pages that is a TLB miss every 4 KB, and the hardware prefetchers stop at every page boundary. With 2 MB
pages neither happens. Most of the weights are separate tensors of 0.5-4 MB, under or near the size of one
huge page, so they are copied into one buffer first, and the buffer is advised before anything is
written to it, so that its pages are faulted in as huge pages (with THP's `defrag` at its default,
`madvise`, the kernel compacts memory for them at fault time).

Measured on the 2-core AMD EPYC (Zen 4, bfloat16, 2 threads, `bench/decode_step.py --dtype bfloat16
--sequences 1,64 --steps 12`): with huge pages through glibc's `glibc.malloc.hugetlb=1` tunable, the
single-stream step 10.3-10.6 -> 9.0-9.2 ms, 64 sequences 57.4-59.9 -> 53.6-57.8 ms; this module's numbers
are in docs/performance.md.

Linux only: madvise(2) with MADV_HUGEPAGE (Python's mmap.madvise). Where THP is off ("never"), madvise
fails or the pages stay small; elsewhere (not Linux) the buffer is plain memory. Either way the tensors are
the same values.
SHOAL_HUGE_PAGES=0 leaves the tensors where they are (for measurements).
"""

from __future__ import annotations

import logging
import mmap
import os
import sys

import torch

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20  # bytes: x86-64's PMD-sized transparent huge page
ALIGN = 64  # bytes between tensors in the buffer: a cache line, as torch's CPU allocator aligns


def enabled() -> bool:
    """Whether gather() moves tensors: Linux, and SHOAL_HUGE_PAGES not "0"."""
    return sys.platform.startswith("linux") and os.environ.get("SHOAL_HUGE_PAGES", "1") != "0"


def gather(owners: list[object], attr: str) -> None:
    """Move the tensor attribute `attr` of every owner (CPU tensors, any dtypes and shapes) into one new
    buffer whose 2 MB-aligned span is advised MADV_HUGEPAGE before it is written: each becomes a contiguous
    copy at a 64-byte boundary, equal to the tensor it replaces. One tensor at a time, so that each
    original is freed as soon as it is replaced (if nothing else holds it): peak memory is the buffer plus
    one tensor. Does nothing when not enabled(). Raises ValueError for a tensor not on the CPU (before
    anything is moved)."""
    if not owners or not enabled():
        return
    tensors = [getattr(o, attr) for o in owners]
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError("huge_pages.gather: every tensor must be on the CPU")
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    del tensors
    span = -(-total // HUGE_PAGE) * HUGE_PAGE  # whole huge pages (the last one's tail is never touched)
    # a new private anonymous mapping, not torch.empty: glibc serves large blocks from memory it already
    # faulted in once its mmap threshold has grown (after large frees, as a model load makes), and madvise
    # does not turn pages already there into huge ones (the test of this module failed that way)
    mapping = mmap.mmap(-1, span + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buffer = torch.frombuffer(mapping, dtype=torch.uint8)  # holds the mapping; unmapped with the last view
    start = -buffer.data_ptr() % HUGE_PAGE  # the first 2 MB boundary in the buffer
    try:  # before anything is written, so that every page of the span is faulted in huge
        mapping.madvise(mmap.MADV_HUGEPAGE, start, span)
    except OSError as e:  # THP off, an old kernel: small pages, the same values
        log.debug("madvise(MADV_HUGEPAGE) failed: %s", e)
    for owner, offset in zip(owners, offsets, strict=True):
        t = getattr(owner, attr)
        nbytes = t.numel() * t.element_size()
        view = buffer[start + offset : start + offset + nbytes].view(t.dtype).view(t.shape)
        view.copy_(t)
        setattr(owner, attr, view)
