"""Data-parallel training under torchrun: the process group, which rank does what, and the few collectives training
needs.

Usage: `ranks = Context.from_env(); device = start(ranks, device)`. Under `torchrun --nproc_per_node=N main.py`
torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a plain `python main.py` has WORLD_SIZE 1, and then
every helper here returns at once: no process group is set up and nothing changes.
"""
import datetime
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

# how long a collective waits for the other ranks: long enough for the first rank of a machine to decode a large
# archive while the others wait at a barrier (a rank that dies does not leave the others waiting this long: torchrun
# stops them all); PNEUMONIA_DIST_TIMEOUT_S sets it, for a slow shared disk or for tests
TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("PNEUMONIA_DIST_TIMEOUT_S", 3600)))


@dataclass(frozen=True)
class Context:
    """This process's place in the job: global rank, number of processes, rank on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun: a process group even of one process (NCCL on one GPU, say)

    @classmethod
    def from_env(cls) -> "Context":
        """The place torchrun gave this process, or the single process of a plain run."""
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)),
                   "TORCHELASTIC_RUN_ID" in env)

    @property
    def main(self) -> bool:
        """Rank 0: the one that creates the run folder, prints, shows progress and writes files."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Whether this process is one rank of a process group: several processes, or one that torchrun started."""
        return self.world > 1 or self.launched

    def share(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's images of a global batch (every world-th from its rank on) and their positions in it.

        Shards are disjoint and together the whole batch; a final batch smaller than the number of
        processes is shared round, so that every rank has an image to step on. One process: all of it.
        """
        if not self.active:
            return batch, None
        keep = torch.arange(self.rank, max(len(batch), self.world), self.world) % len(batch)
        return batch[keep], keep


def start(ranks: Context, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on the CPU), silence stdout off rank 0; returns this rank's device."""
    if not ranks.active:
        return device
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        if ranks.local_rank >= visible:
            raise ValueError(f"this process has LOCAL_RANK {ranks.local_rank}, but only {visible} GPU(s) are visible "
                             f"on this machine; start torchrun with --nproc_per_node={visible} or fewer, or train on "
                             f"the CPU with --device cpu")
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"torchrun training runs on cuda or cpu, not {device.type}; use --device cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    if not ranks.main:
        sys.stdout = open(os.devnull, "w")
    return device


def stop(ranks: Context, finished: bool = True) -> None:
    """Leave the process group (a second call does nothing). A rank that `finished` first waits for every other, so
    that no rank tears down its connections while a peer is still at work on them (a rare abort of the rank left
    behind, seen in CI); one leaving on an error does not wait, since a peer may be gone. Training calls it as
    soon as the last collective is done, before rank 0 scores alone."""
    if ranks.active and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def broadcast(value, ranks: Context):
    """Rank 0's value (any picklable object) on every rank."""
    if not ranks.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value, ranks: Context) -> list:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    if not ranks.active:
        return [value]
    out = [None] * ranks.world
    dist.all_gather_object(out, value)
    return out


def barrier(ranks: Context) -> None:
    if ranks.active:
        dist.barrier()


@contextmanager
def local_main_first(ranks: Context):
    """Run the block on each machine's first rank, then on the others: it fills the decode cache they then map."""
    if ranks.active and ranks.local_rank != 0:
        dist.barrier()
    yield
    if ranks.active and ranks.local_rank == 0:
        dist.barrier()


def all_sum(values: list[float], ranks: Context, device: torch.device) -> list[float]:
    """Element-wise sums over every rank (float64)."""
    if not ranks.active:
        return values
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def shard_rows(n: int, ranks: Context) -> torch.Tensor:
    """The rows of n that this rank scores: rank, rank + world, ..."""
    return torch.arange(ranks.rank, n, ranks.world)


def gather_rows(local: torch.Tensor, n: int, ranks: Context, device: torch.device) -> torch.Tensor:
    """Every rank's `shard_rows` results, back in row order 0..n-1 (a CPU tensor), on every rank."""
    if not ranks.active:
        return local
    per = -(-n // ranks.world)
    padded = torch.zeros((per, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[:len(local)] = local.to(device)
    parts = [torch.empty_like(padded) for _ in range(ranks.world)]
    dist.all_gather(parts, padded)
    # row j of rank r is global row j * world + r
    return torch.stack(parts, 1).reshape(per * ranks.world, *local.shape[1:])[:n].cpu()


def sync_buffers(model: torch.nn.Module, ranks: Context) -> None:
    """Rank 0's BatchNorm running statistics on every rank: each rank's last step updated its own copy."""
    if ranks.active:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
