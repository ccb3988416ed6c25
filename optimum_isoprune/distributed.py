"""Pruning under a distributed launch (`torchrun`, `accelerate launch`): shard the calibration data, sum gradients.

Every process runs `IsomorphicPruner.prune` on the same model and the same calibration data. Taylor importance is
the only step whose cost grows with the data, so each process accumulates gradients on its share of the batches
(batch `i` goes to rank `i % world_size`), the gradients are summed across processes, and every process then
scores, solves the budget and cuts with identical numbers. The pruned models are compared by a hash of their
weights: DDP needs the same model everywhere, and a difference stops every process with `DistributedPruningError`.
Without an initialised process group (one process) every function here is a no-op.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .errors import IsoPruneError

logger = logging.getLogger(__name__)

T = TypeVar("T")


class DistributedPruningError(IsoPruneError, RuntimeError):
    """The processes of a distributed launch pruned to different models."""


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def end_process_group() -> None:
    """Destroy the default process group, if one is initialised; call once at the end of a launched script.

    A process that exits with a live gloo group can abort at interpreter shutdown ("terminate called without an
    active exception"), failing the launch after the work succeeded; transformers' Trainer leaves the group open.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard(items: Sequence[T]) -> list[T]:
    """This process's share of `items` (every `world_size`-th one, from `rank`); all of them in one process."""
    rank, world = rank_and_world()
    return list(items[rank::world])


def _reduce_device(model: nn.Module) -> torch.device:
    """Where collectives run: the model's device, except that gloo needs CPU tensors."""
    device = next(model.parameters()).device
    return torch.device("cpu") if dist.get_backend() == "gloo" else device


def all_reduce_gradients(model: nn.Module, count: int) -> int:
    """Sum `model`'s gradients (and the batch `count`) over all processes; returns the total number of batches.

    Parameters that got a gradient on any process get the sum on every process (zeros stand in where a process had
    none, e.g. one with no calibration batch), so all processes score from the same numbers.
    """
    rank, world = rank_and_world()
    if world == 1:
        return count
    device = _reduce_device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    chosen = [p for p, flag in zip(params, has_grad.tolist()) if flag]
    if chosen:
        flat = torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).to(device, torch.float32)
                for p in chosen
            ]
        )
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in chosen:
            size = p.numel()
            p.grad = flat[offset : offset + size].view_as(p).to(p.device, p.dtype).clone()
            offset += size
    total = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    logger.info(
        "Rank %d/%d: Taylor gradients summed over %d calibration batches (%d here).", rank, world, int(total), count
    )
    return int(total)


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and bytes, in order)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def check_same_model_on_all_ranks(model: nn.Module) -> str | None:
    """Compare the pruned model's fingerprint across processes; raise `DistributedPruningError` when they differ.

    Returns the fingerprint (the same on every process when this returns); None in a single process.
    """
    rank, world = rank_and_world()
    if world == 1:
        return None
    fingerprint = model_fingerprint(model)
    gathered: list[str | None] = [None] * world
    dist.all_gather_object(gathered, fingerprint)
    if len(set(gathered)) != 1:
        differing = [r for r, f in enumerate(gathered) if f != gathered[0]]
        raise DistributedPruningError(
            f"The {world} processes pruned to different models (ranks {differing} differ from rank 0: fingerprints "
            f"{sorted(set(f[:12] for f in gathered if f))}). DDP needs one model: give every process the same model, "
            "seed and calibration data (the same dataset, not a per-rank shard: batches are split across ranks here)."
        )
    logger.info("Rank %d/%d: pruned model fingerprint %s matches every process.", rank, world, fingerprint[:12])
    return fingerprint
