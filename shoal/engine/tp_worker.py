"""Tensor-parallel ranks 1..N-1 as worker processes, driven by rank 0: the engine's own model runner.

The engine keeps scheduling, sampling and detokenizing in its one process; only the forward is spread.
Rank 0 (`TensorParallelRunner`, a ModelRunner) sends each step's StepInput to every worker and then runs
the forward itself; each worker runs the same ModelRunner.run on its own slice of the model and its own
KV cache (its KV heads), so every rank meets the same collectives in the same order. Logits come out
gathered on every rank; the workers drop theirs.

The channel to a worker is its stdin: a pipe carrying pickled messages (multiprocessing's Connection
framing): first the WorkerSpec, then the number of KV blocks once rank 0 has sized the cache, then one
StepInput per step, and None to stop. nano-vllm passes the same (method, args) messages through shared
memory and an Event per worker; a pipe costs a copy of a few KB per step, needs no names in /dev/shm, and
tells the worker when the engine is gone: the read ends (EOFError) and the worker exits. A watchdog
thread also exits when the parent process changes (the worker may be blocked in a collective), so
workers never outlive the engine. Workers are plain subprocesses, not multiprocessing children, because
the engine core itself runs as a daemonic multiprocessing process, which may not have children.

On CPU each rank gets max(1, threads // N) intra-op threads: the ranks compute at the same time, and
more threads than cores in total would slow every collective down to the slowest rank.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from shoal.engine.model_runner import ModelRunner, StepInput
from shoal.model.config import ModelConfig
from shoal.model.device import DTYPES
from shoal.model.tensor_parallel import check_tensor_parallel
from shoal.model.tp_group import TPGroup, join_store, serve_store

log = logging.getLogger(__name__)
STOP_TIMEOUT_S = 10.0
PARENT_POLL_S = 1.0


@dataclass
class WorkerSpec:
    """What a worker needs to load its slice of the model (the first message it reads)."""

    rank: int
    world_size: int
    store_port: int
    model_path: str
    dtype: str  # a key of model.device.DTYPES
    device: str  # "cpu" or "cuda:<rank>"
    max_positions: int | None
    block_size: int
    threads: int


def rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else device


class TensorParallelWorkers:
    """Rank 0's handle on ranks 1..N-1: their processes, the pipes to them, and rank 0's TPGroup."""

    def __init__(self, procs: list[subprocess.Popen], conns: list[Connection], group: TPGroup):
        self.procs, self.conns, self.group = procs, conns, group
        # At interpreter exit too (an engine nobody closed): stop the workers rather than orphan them.
        self._stop = weakref.finalize(self, _stop_workers, procs, conns)

    @classmethod
    def start(
        cls,
        size: int,
        model_path: Path,
        model_cfg: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        max_positions: int | None,
        block_size: int,
    ) -> TensorParallelWorkers:
        """Check that the model splits into `size` ranks (ValueError otherwise, before any process starts),
        spawn the workers and connect rank 0 to them (blocks until they have joined)."""
        check_tensor_parallel(model_cfg, size)
        threads = max(1, torch.get_num_threads() // size)
        torch.set_num_threads(threads)
        log.info("tensor parallel: %d ranks, %d CPU thread(s) each", size, threads)
        store = serve_store(size)
        dtype_name = str(dtype).removeprefix("torch.")
        procs, conns = [], []
        try:
            for rank in range(1, size):
                spec = WorkerSpec(
                    rank, size, store.port, str(model_path), dtype_name,
                    str(rank_device(device, rank)), max_positions, block_size, threads,
                )  # fmt: skip
                proc, conn = _spawn(threads)
                procs.append(proc)
                conns.append(conn)
                conn.send(spec)
            group = TPGroup(store, 0, size, rank_device(device, 0))
        except BaseException:
            _stop_workers(procs, conns)
            raise
        return cls(procs, conns, group)

    def send(self, message) -> None:
        """To every worker; RuntimeError naming the worker if one is gone."""
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns, strict=True), start=1):
            try:
                conn.send(message)
            except OSError as e:
                raise RuntimeError(
                    f"tensor-parallel worker of rank {rank} (pid {proc.pid}) is gone (exit code {proc.poll()})"
                ) from e

    def close(self) -> None:
        """Stop every worker (each leaves its loop and exits); idempotent."""
        self._stop()


def _spawn(threads: int) -> tuple[subprocess.Popen, Connection]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    # The worker imports shoal from where this process did, whatever its working directory.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen([sys.executable, "-m", "shoal.engine.tp_worker"], stdin=subprocess.PIPE, env=env)
    conn = Connection(os.dup(proc.stdin.fileno()), readable=False)
    proc.stdin.close()
    return proc, conn


def _stop_workers(procs: list[subprocess.Popen], conns: list[Connection]) -> None:
    for conn in conns:
        try:
            conn.send(None)
        except OSError:  # already gone
            pass
        conn.close()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning(
                "tensor-parallel worker %d did not stop in %.0f s; killing it", proc.pid, STOP_TIMEOUT_S
            )
            proc.kill()
            proc.wait()


class TensorParallelRunner(ModelRunner):
    """Rank 0's ModelRunner: every run() first goes to the workers, then runs here."""

    def __init__(
        self, workers: TensorParallelWorkers, model, num_blocks: int, block_size: int, device, dtype
    ):
        super().__init__(model, num_blocks, block_size, device, dtype)
        self.workers = workers
        self._failed_step: str | None = None
        workers.send(num_blocks)
        workers.group.barrier()  # every worker has loaded its slice and allocated its KV cache

    def run(self, inp: StepInput, between_layers=None) -> list[torch.Tensor]:
        """As ModelRunner.run, never interrupted: the workers run the same forward in lockstep, and a
        rank that left it between layers would leave them waiting in a collective (between_layers is
        ignored)."""
        if self._failed_step is not None:
            raise RuntimeError(
                f"tensor-parallel ranks are out of step since a failed step ({self._failed_step}); "
                "restart the engine"
            )
        self.workers.send(inp)
        try:
            return super().run(inp)
        except Exception as e:
            # Workers may still wait in a collective this rank never reached: later steps cannot line up.
            self._failed_step = f"{type(e).__name__}: {e}"
            raise

    def close(self) -> None:
        self.workers.close()


# ---- the worker process -------------------------------------------------------------------------------
def _exit_with_parent() -> None:
    """A thread that ends this process once its parent is gone (re-parented), even mid-collective."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def serve_rank(conn: Connection) -> None:
    """Load this rank's slice, then run every StepInput that arrives until None (or the pipe closes)."""
    from shoal.model.loader import load_model

    spec: WorkerSpec = conn.recv()
    torch.set_num_threads(spec.threads)
    device, dtype = torch.device(spec.device), DTYPES[spec.dtype]
    group = TPGroup(join_store(spec.store_port, spec.world_size), spec.rank, spec.world_size, device)
    model, _ = load_model(Path(spec.model_path), dtype, device, spec.max_positions, tp=group)
    num_blocks = conn.recv()
    if num_blocks is None:  # rank 0 failed to start after all
        return
    runner = ModelRunner(model, num_blocks, spec.block_size, device, dtype)
    group.barrier()
    while (inp := conn.recv()) is not None:
        runner.run(inp)


def main() -> None:
    from shoal.logging_config import LOG_FORMAT_ENV, configure_logging

    configure_logging(
        os.environ.get("SHOAL_CORE_LOG_LEVEL", "WARNING"), os.environ.get(LOG_FORMAT_ENV, "text")
    )
    _exit_with_parent()
    conn = Connection(os.dup(sys.stdin.fileno()), writable=False)
    try:
        serve_rank(conn)
    except EOFError:  # the engine closed the pipe or died without saying stop
        sys.exit(1)
    except Exception:
        log.exception("tensor-parallel worker failed")
        sys.exit(1)


if __name__ == "__main__":
    main()
