"""Collectives the trainer needs beyond llama.parallel's: gradient sums over the data-parallel group and the
global gradient norm under model parallelism (sharded parameters' squares summed over the group, replicas once)
and FSDP (squares summed over the data-parallel group too)."""
from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from llama.parallel import ParallelEmbedding, ParallelLinear, get_model_parallel_group, get_model_parallel_world_size


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this process stores: a DTensor's local shard (FSDP), else ``t`` itself (a view, writable)."""
    return t.to_local() if isinstance(t, DTensor) else t


def all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    """In-place sum over ``group``; a no-op without one (a single process)."""
    if group is not None:
        dist.all_reduce(t, group=group)
    return t


def all_reduce_grads(params: List[torch.nn.Parameter], group, bucket_bytes: int = 25 << 20) -> None:
    """Sum gradients over the data-parallel group, a bucket of flattened grads per collective."""
    if group is None:
        return
    bucket, size = [], 0
    for p in params + [None]:
        if p is not None:
            bucket.append(p.grad)
            size += p.grad.numel() * p.grad.element_size()
        if bucket and (p is None or size >= bucket_bytes):
            flat = torch.cat([g.flatten() for g in bucket])
            dist.all_reduce(flat, group=group)
            for g, piece in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(piece.view_as(g))
            bucket, size = [], 0


def is_model_parallel_sharded(model: torch.nn.Module, name: str, param: torch.nn.Parameter) -> bool:
    """Whether ``param`` holds a different slice on each model-parallel rank (vs a replica on each).

    An explicit ``param.model_parallel_sharded`` attribute wins; otherwise the dense weight of a parallel linear
    or embedding is sharded, a LoRA factor is as its layer's ``shard_dims`` says (lora_A of a row-parallel layer,
    lora_B of a column-parallel one), and everything else (norms) is replicated.
    """
    if get_model_parallel_world_size() == 1:
        return False
    explicit = getattr(param, "model_parallel_sharded", None)
    if explicit is not None:
        return bool(explicit)
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if isinstance(owner, (ParallelLinear, ParallelEmbedding)) and leaf == "weight":
        return True
    shard_dims = getattr(owner, "shard_dims", None)  # kollama.adapters.lora.LoRALinear: {"lora_A": dim or None, ...}
    if isinstance(shard_dims, dict) and leaf in shard_dims:
        return shard_dims[leaf] is not None
    return False


def clip_grad_norm(params, sharded_flags, max_norm: float, data_sharded_group=None) -> torch.Tensor:
    """Global gradient norm over all model-parallel ranks (sharded squares all-reduced over the MP group,
    replicated ones counted once), and scaling of every gradient when it exceeds ``max_norm`` (0 = no clipping).

    ``data_sharded_group``: under FSDP every gradient is also split over the data-parallel group (a DTensor whose
    local shard is what this rank holds), so the squares are first summed over that group as well."""
    grads = [local(p.grad) for p in params]
    sq = torch.zeros(2, dtype=torch.float64, device=grads[0].device)  # [sharded, replicated] over model parallel
    for g, sharded in zip(grads, sharded_flags):
        sq[0 if sharded else 1] += torch.linalg.vector_norm(g, dtype=torch.float32).double() ** 2
    all_reduce(sq, data_sharded_group)
    total = (all_reduce(sq[:1], get_model_parallel_group())[0] + sq[1]).sqrt()
    if max_norm and max_norm > 0:
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0).float()
        for g in grads:
            g.mul_(scale.to(g.dtype))
    return total.float()
