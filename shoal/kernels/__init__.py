"""Native CPU kernels: small C files built on first use with the system C compiler and called through ctypes.

Why not torch.utils.cpp_extension: compiling against torch's C++ headers takes about a minute on two cores,
while these kernels take raw pointers and build in about a second. The build is cached per source, flags,
compiler and CPU, so it happens once per machine. Every kernel has a pure-PyTorch fallback, taken where no
C compiler is found or where SHOAL_NATIVE_KERNELS=0 says so.

Trust: the C functions trust their arguments, so each kernel's Python wrapper checks dtypes, devices,
shapes and strides before every call and raises ValueError (TypeError for a wrong dtype) instead. Checks
that depend on tensor contents (block ids, lengths) run in C, before the kernel touches memory, and come
back as an error status, as does a failed allocation: `check_status` turns a status into an exception.

Flags: no -ffast-math. It lets the compiler assume there are no NaNs or infinities, which the attention
softmax meets on purpose (-inf scores); -fno-math-errno is what vectorizing expf needs (see
paged_decode_attention.c), and GCC contracts a * b + c into FMAs by default (-ffp-contract=fast).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch  # loads torch's libgomp first, so the kernels' OpenMP shares torch's threads

log = logging.getLogger(__name__)
SOURCE_DIR = Path(__file__).parent
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC"]
LIBS = ["-lmvec", "-lm"]  # glibc's vector math: vectorized expf in the softmax


def enabled() -> bool:
    return os.environ.get("SHOAL_NATIVE_KERNELS", "1") != "0"


def cache_dir() -> Path:
    root = os.environ.get("SHOAL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "shoal"
    )
    return Path(root) / "kernels"


def _build_key(source: bytes, cc: str) -> str:
    """Whatever changes the machine code: the source, the headers beside it (any source may include
    them), flags, compiler version and the CPU (-march=native)."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    try:
        cpu = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
        )
    except (OSError, StopIteration):
        cpu = ""
    headers = [h.read_bytes() for h in sorted(SOURCE_DIR.glob("*.h"))]
    parts = [source, *headers, " ".join(FLAGS + LIBS).encode(), version.encode(), cpu.encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def _compile(source: Path, target: Path, cc: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [cc, *FLAGS, str(source), "-o", tmp, *LIBS]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()}")
        os.replace(tmp, target)  # atomic: concurrent builders never load a half-written file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@lru_cache
def load(name: str) -> ctypes.CDLL | None:
    """The compiled library for SOURCE_DIR/<name>.c, building it if needed; None where it cannot be had
    (the caller then takes its PyTorch path). A failed build is logged once, with the compiler's message."""
    if not enabled():
        return None
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        log.warning("no C compiler (%s) found: native kernels off, using the PyTorch paths", cc)
        return None
    source = SOURCE_DIR / f"{name}.c"
    target = cache_dir() / f"{name}-{_build_key(source.read_bytes(), cc)}.so"
    try:
        if not target.exists():
            log.info("building native kernel %s -> %s", source.name, target)
            _compile(source, target, cc)
        return ctypes.CDLL(str(target))
    except (OSError, RuntimeError) as exc:
        log.warning("native kernel %s unavailable, using the PyTorch path: %s", name, exc)
        return None


@lru_cache
def function(name: str, symbol: str, argtypes: tuple, restype: type | None = None) -> ctypes._CFuncPtr | None:
    """The C function `symbol` of kernel `name`, with its argument and return types set once (restype None:
    void; ctypes.c_int for a function that returns a status); None where the kernel cannot be had, or where
    this build has no such symbol (one compiled only for some CPUs, as gemm.c's bf16 kernel)."""
    lib = load(name)
    fn = None if lib is None else getattr(lib, symbol, None)
    if fn is None:
        return None
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn


# Statuses returned by the kernels that can fail (the same numbers in every .c file).
OK, NO_MEMORY, BAD_INPUT = 0, 1, 2


def check_status(status: int, kernel: str, explain=None) -> None:
    """Raise for a kernel's non-zero status: MemoryError when its allocation failed; ValueError for inputs
    it refused, with explain() (called only then) saying what was wrong."""
    if status == OK:
        return
    if status == NO_MEMORY:
        raise MemoryError(f"{kernel}: out of memory for its work buffers")
    detail = explain() if explain is not None and status == BAD_INPUT else f"status {status}"
    raise ValueError(f"{kernel}: {detail}")


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` for the block, then restored (also when it raises);
    unchanged for None. The OpenMP team of every torch op and of these kernels (which read
    torch.get_num_threads() per call) follows it; libgomp keeps the extra workers parked between teams,
    so a switch costs microseconds."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
