"""Data-parallel training across processes with torch.distributed, launched by torchrun.

Only the trained layers have gradients, so a data-parallel step all-reduces those gradients (one flat
bucket) and a few scalars, nothing else: every rank holds the whole frozen model and its own rollout
engine, samples its share of the step's prompts, and takes the identical optimizer step.

torchrun (`torch.distributed.run`) starts the processes and does the rendezvous, on one node or many;
this module reads its environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) through
`init_process_group`: gloo on CPU, NCCL on CUDA with one rank per GPU. Without torchrun (WORLD_SIZE
unset or 1) every helper here is a no-op for a world of one, so the single-process path is unchanged.
"""
from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .errors import ConfigError, RunError, SparseLayerError

# how long a collective waits for a rank that neither answers nor dies (a dead rank stops the job at once:
# torchrun's agent sees it exit and ends the others)
TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class World:
    """This process's place in the job: global rank, number of ranks, rank on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the run directory, logs and prints."""
        return self.rank == 0

    def shard(self, n: int, rank: int | None = None) -> range:
        """This rank's (or `rank`'s) contiguous share of n items: the first n % size ranks take one more.

        Used on prompts, so a rank always gets whole GRPO groups (a prompt and all its completions).
        """
        r = self.rank if rank is None else rank
        base, extra = divmod(n, self.size)
        start = r * base + min(r, extra)
        return range(start, start + base + (r < extra))

    def engine_group(self, tp: int) -> World:
        """The world of rollout engines when each spans `tp` ranks (--vllm-tensor-parallel-size): ranks
        g*tp .. g*tp+tp-1 share engine g, vLLM's external-launcher numbering (its data-parallel rank is
        RANK // tp). With tp 1 it is this world."""
        return World(self.rank // tp, self.size // tp, self.local_rank)

    def within_engine_group(self, tp: int) -> World:
        """This rank's place among the `tp` ranks of its engine group (which part of the group's rollouts
        it trains on)."""
        return World(self.rank % tp, tp, self.local_rank)


def launched_size() -> int:
    """The number of ranks torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's global rank as torchrun set it (0 outside torchrun), valid before and after the
    process group exists."""
    return int(os.environ.get("RANK", "0"))


def world() -> World:
    """The current world: the initialised process group's, else a world of one."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def setup(device: str = "auto") -> World:
    """Join torchrun's process group once (gloo for a CPU run, NCCL for CUDA with one GPU per local rank).

    Idempotent; outside torchrun it does nothing and returns a world of one. On CUDA it makes the local
    rank's GPU the current device, so the model loads there.
    """
    if launched_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return world()
    if not dist.is_available():
        raise RunError("this PyTorch build has no torch.distributed: run one process")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise RunError(f"rank with local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} "
                           "visible): start at most one process per GPU (--nproc-per-node)")
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return world()


def check_tensor_parallel(tp: int, device_type: str, rollout: str, w: World) -> None:
    """--vllm-tensor-parallel-size above 1: GPU only (vLLM's external-launcher mode under torchrun), a
    vLLM engine, and a number of ranks it divides; ConfigError with one line otherwise."""
    if tp == 1:
        return
    if device_type != "cuda":
        raise ConfigError(f"--vllm-tensor-parallel-size {tp} needs GPUs (one vLLM engine over {tp} torchrun ranks' "
                          "GPUs, vLLM's external-launcher mode); on CPU leave it at 1")
    if rollout == "hf":
        raise ConfigError("--vllm-tensor-parallel-size is for vLLM engines: not with --rollout hf")
    if w.size % tp:
        raise ConfigError(f"--vllm-tensor-parallel-size {tp} must divide the {w.size} ranks of the job")


def vllm_launcher_kwargs(tp: int, w: World) -> dict[str, Any]:
    """vLLM `LLM(...)` arguments for an engine spanning `tp` ranks of this torchrun job: tensor parallel
    inside each engine group, one data-parallel replica per group, torchrun as the launcher."""
    return {"tensor_parallel_size": tp, "data_parallel_size": w.size // tp,
            "distributed_executor_backend": "external_launcher"}


def teardown() -> None:
    """Leave the process group (at the end of a run), if one is joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    """Where collective tensors live: the current GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def all_reduce_gradients(params: Sequence[torch.Tensor]) -> int:
    """Sum the `.grad` of `params` over all ranks in ONE flat bucket; return the bytes the bucket holds.

    Each rank's loss is already its share of the global batch loss (global normalisers), so the sum is
    the single-process gradient. A parameter without a gradient contributes zeros (every rank must send
    the same layout) and gets the summed gradient. A world of one does nothing and returns 0.
    """
    if world().size == 1 or not params:
        return 0
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    bucket = torch.cat([g.reshape(-1) for g in grads])
    comm = bucket.to(_comm_device())  # the same tensor unless NCCL needs it moved to the GPU
    dist.all_reduce(comm)
    bucket = comm.to(bucket.device)
    offset = 0
    for p, g in zip(params, grads):
        part = bucket[offset:offset + g.numel()].view_as(g)
        offset += g.numel()
        if p.grad is None:
            p.grad = part.clone()
        else:
            p.grad.copy_(part)
    return bucket.numel() * bucket.element_size()


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Each value summed over all ranks (float64; counts and loss totals), in one collective."""
    if world().size == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable, small: rewards, RNG states), in rank order, on every rank."""
    if world().size == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (a checkpoint read by rank 0, the run's output directory)."""
    if world().size == 1:
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op for a world of one)."""
    if world().size > 1:
        dist.barrier()


@contextlib.contextmanager
def rank_errors() -> Iterator[None]:
    """Name the rank in a one-line error raised inside, and turn a lost peer into one line too.

    A rank that raises exits non-zero; torchrun then stops the other ranks, so the job ends instead
    of hanging in a collective. The message says which rank failed and why.
    """
    w = world()
    if w.size == 1:
        yield
        return
    try:
        yield
    except SparseLayerError as exc:
        raise type(exc)(f"rank {w.rank}: {exc}") from None
    except (dist.DistError, RuntimeError) as exc:
        if not isinstance(exc, dist.DistError) and "gloo" not in str(exc).lower():
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0][:160]
        raise RunError(f"rank {w.rank}: lost contact with the other ranks ({first}); another rank probably "
                       "failed: see its line; continue with --resume") from None


def launch(nproc_per_node: int, argv: Sequence[str]) -> int:
    """`sparselayer train --nproc-per-node N ...`: hand the same command to torch.distributed.run on this
    node (standalone rendezvous); a failed rank becomes one RunError line naming the rank and the cause."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if nproc_per_node < 1:
        raise RunError(f"--nproc-per-node must be at least 1, got {nproc_per_node}")
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc_per_node}",
                                         "-m", "sparselayer", *argv])
    try:
        run(args)
    except ChildFailedError as exc:
        raise RunError(describe_failures(exc.failures)) from None
    except SignalException as exc:  # Ctrl-C or a kill of this launcher: torchrun has stopped the ranks
        if exc.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None
        raise RunError(f"stopped by {exc.sigval.name}: the last checkpoint is intact: continue with --resume") from None
    return 0


def describe_failures(failures: dict[int, Any]) -> str:
    """One line for torchrun's failed ranks (rank -> ProcessFailure), the likely cause first: a rank killed
    by a signal, then one that exited with an error, then those torchrun itself stopped (SIGTERM)."""
    def cause(f: Any) -> str:
        if f.exitcode < 0:
            return f"killed by {f.signal_name()}"
        return f"exited with status {f.exitcode}"

    def order(item: tuple[int, Any]) -> tuple[int, float, int]:
        rank, f = item
        stopped = f.exitcode < 0 and f.signal_name() in ("SIGTERM", "SIGINT")
        return (2 if stopped else 0 if f.exitcode < 0 else 1, f.timestamp, rank)

    ordered = sorted(failures.items(), key=order)
    parts = [f"rank {rank} {cause(f)}" for rank, f in ordered]
    return (f"{parts[0]}, which stopped the job" + (f" ({'; '.join(parts[1:])})" if parts[1:] else "")
            + "; the last checkpoint is intact: continue with --resume")
