"""The process group and what crosses it: rank/world, float64 sums, flags, rank seeds.

Under ``torchrun`` (``WORLD_SIZE`` > 1) :func:`setup` starts the process group: NCCL when the run
uses CUDA, gloo otherwise. Every helper here is a no-op for one process, so the loop calls them
unconditionally.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dkl.config import ConfigError, TrainConfig
from dkl.data import mix_seed
from dkl.train.checkpoint import config_changes

__all__ = [
    "Dist",
    "all_gather_objects",
    "all_reduce_sum",
    "any_rank",
    "is_main_process",
    "max_abs_diff_across_ranks",
    "rank_seed",
    "seed_all",
    "select_device",
    "setup",
    "to_device",
]


@dataclass(frozen=True)
class Dist:
    """Where this process sits: global ``rank`` of ``world`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """The number of ranks torchrun's environment announces (1 when ``WORLD_SIZE`` is unset or
    empty)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def setup(device: str = "auto", timeout_minutes: float = 0.0) -> Dist:
    """Read torchrun's environment and start the process group if there is more than one rank
    (``timeout_minutes``: how long a collective waits for every rank; 0 = torch's default)."""
    world = env_world_size()
    rank = int(os.environ.get("RANK", "0") or 0)
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if world > 1 and not dist.is_initialized():
        want_cuda = device != "cpu" and torch.cuda.is_available()
        if want_cuda:
            torch.cuda.set_device(local_rank)
        timeout = {"timeout": timedelta(minutes=timeout_minutes)} if timeout_minutes > 0 else {}
        dist.init_process_group("nccl" if want_cuda else "gloo", **timeout)
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    return Dist(rank, world, local_rank)


# settings that may differ between ranks: where each machine keeps its files
_PER_MACHINE = ("root", "dir", "checkpoint", "path", "device", "threads", "num_workers")


def check_same_config(settings: dict) -> None:
    """Refuse ranks launched with different settings (a node's own ``seed=`` or ``lr=``): DDP
    would still train, with rank 0's weights but each rank's data order, labeled subset and
    schedule. Paths, devices and thread counts may differ per machine."""
    if not _active():
        return
    for rank, theirs in enumerate(all_gather_objects(settings) or []):
        differ = [c for c in config_changes(theirs, settings) if not c[0].endswith(_PER_MACHINE)]
        if differ:
            key, there, here = differ[0]
            raise ConfigError(
                f"rank {rank} was launched with other settings than rank {dist.get_rank()}: "
                f"{key} = {there!r} there, {here!r} here"
                + (f" (and {len(differ) - 1} more)" if len(differ) > 1 else "")
                + "; launch every rank with the same config and overrides"
            )


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _comm_device(t: torch.Tensor) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo takes CPU ones
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over ranks (a new tensor on ``t``'s device; ``t`` itself for one process).

    Sums of counts and losses travel in float64 so that they are exact whatever the world size.
    """
    if not _active():
        return t
    out = t.detach().to(_comm_device(t), torch.float64)
    dist.all_reduce(out)
    return out.to(t.device)


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (all ranks stop together)."""
    return bool(max_over_ranks(float(flag)))


def max_over_ranks(value: float) -> float:
    """The largest ``value`` of all ranks, on every rank."""
    if not _active():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device(torch.empty(0)))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's ``obj``, in rank order, on every rank; ``None`` for one process."""
    if not _active():
        return None
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: torch.nn.Module) -> None:
    """``module``'s floating buffers (BatchNorm's running statistics) set to rank 0's, in place.
    Each rank updates them from its own batches, and DDP copies rank 0's only at the next
    forward: evaluated as they are, every rank scored another model than the one rank 0 saves."""
    if not _active():
        return
    for b in module.buffers():
        if b.is_floating_point():
            t = b.detach().to(_comm_device(b))
            dist.broadcast(t, 0)
            b.copy_(t)


def max_abs_diff_across_ranks(tensors: list[torch.Tensor]) -> float:
    """``max |t - t_rank0|`` over ranks and elements (how far replicas have drifted apart)."""
    flat = torch.cat([t.detach().flatten().double() for t in tensors])
    if not _active():
        return 0.0
    flat = flat.to(_comm_device(flat))
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s own random stream once the models are built (rank 0: ``seed``)."""
    return seed if rank == 0 else mix_seed(seed, 0, 7_919 * rank)


def select_device(cfg: TrainConfig, dist: Dist) -> torch.device:
    """The run's device (``train.device``; ``cuda`` means this rank's GPU) and its flags."""
    t = cfg
    want = t.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device: '{want}' requested but CUDA is not available")
        if want == "cuda":
            want = f"cuda:{dist.local_rank if dist.world > 1 else torch.cuda.current_device()}"
    try:
        device = torch.device(want)
    except RuntimeError as e:
        raise ConfigError(f"train.device: {want!r} is not a device torch knows ({e})") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"train.device: '{want}' requested but this machine has "
            f"{torch.cuda.device_count()} CUDA device(s)"
        )
    if device.type not in ("cpu", "cuda"):
        backend = getattr(torch.backends, device.type, None) or getattr(torch, device.type, None)
        available = getattr(backend, "is_available", None)
        if not (callable(available) and available()):
            raise ConfigError(f"train.device: '{want}' requested but it is not available here")
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    if device.type == "cuda":
        if t.deterministic:
            # CPU kernels are already deterministic for a fixed thread count; on CUDA ask torch to
            # pick deterministic kernels (and warn where none exists)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = not t.deterministic
    return device


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors anywhere in nested lists / tuples / dicts, moved to ``device``."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch
