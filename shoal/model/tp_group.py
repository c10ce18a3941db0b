"""The collectives of one tensor-parallel group: the ranks that each hold a slice of every layer.

torch.distributed does the communication: gloo on CPU, NCCL on CUDA. The group is a process-group object
made directly from a rendezvous store rather than the process-wide default group that
`init_process_group` sets up, so that a process may hold several engines (the test suite, the fleet's
several models) and an engine's group goes away with it. All ranks run on one host: rank 0 serves a
TCPStore on 127.0.0.1 at a free port and the other ranks connect to it.

Only three operations are needed by the model (see model/tensor_parallel.py): a sum over ranks after a
row-parallel linear and after the vocab-parallel embedding, and a gather of the vocab-parallel logits.
Every rank must call them in the same order with tensors of the same shape; the ranks run the same forward
on the same step input (engine/tp_worker.py), which guarantees it.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

HOST = "127.0.0.1"
# A step of a large prompt on a slow CPU may take minutes; a collective that waits longer than this means a
# rank is gone or out of step, and it raises instead of hanging.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
RENDEZVOUS_TIMEOUT = datetime.timedelta(seconds=120)


def serve_store(world_size: int) -> dist.TCPStore:
    """Rank 0's rendezvous store on a free local port (read it from `.port`)."""
    return dist.TCPStore(
        HOST, 0, world_size, is_master=True, wait_for_workers=False, timeout=RENDEZVOUS_TIMEOUT
    )


def join_store(port: int, world_size: int) -> dist.TCPStore:
    return dist.TCPStore(HOST, port, world_size, is_master=False, timeout=RENDEZVOUS_TIMEOUT)


class TPGroup:
    """One rank's view of the group. `rank` 0 is the engine's own process; `world_size` is
    --tensor-parallel-size. Construction blocks until every rank has joined (RENDEZVOUS_TIMEOUT)."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, device: torch.device):
        self.rank, self.world_size, self.device = rank, world_size, device
        self._pg = _process_group(store, rank, world_size, device)

    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place (every rank gets the sum); returns x."""
        self._pg.allreduce([x]).wait()
        return x

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's x (same shape and dtype on all ranks), in rank order."""
        out = [torch.empty_like(x) for _ in range(self.world_size)]
        self._pg.allgather([out], [x.contiguous()]).wait()
        return out

    def barrier(self) -> None:
        """Returns once every rank has called it; raises if a rank died (its connection closed)."""
        self.all_reduce_(torch.zeros(1, device=self.device))


def _process_group(store: dist.Store, rank: int, world_size: int, device: torch.device):
    if device.type == "cuda":
        torch.cuda.set_device(device)
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = COLLECTIVE_TIMEOUT
        return dist.ProcessGroupNCCL(store, rank, world_size, options)
    options = dist.ProcessGroupGloo._Options()
    # Loopback explicitly: gloo's default device resolves the host name, which containers often map to
    # an address other ranks cannot reach (or none at all).
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=HOST)]
    options._timeout = COLLECTIVE_TIMEOUT
    return dist.ProcessGroupGloo(store, rank, world_size, options)
