"""Model (tensor) parallelism over plain torch.distributed, without fairscale.

The layers follow Megatron/fairscale semantics and Meta's checkpoint sharding:

* ``ColumnParallelLinear`` splits the output features (weight dim 0): wq, wk, wv, w1, w3, output.
* ``RowParallelLinear`` splits the input features (weight dim 1) and all-reduces the partial sums: wo, w2.
* ``ParallelEmbedding`` splits the embedding dim (weight dim 1) and all-gathers: tok_embeddings.

Every collective is an autograd function, so the same layers train (backward of an identity that feeds several
ranks is an all-reduce, and so on). With model parallel size 1 every collective is the identity and no process
group is needed, so a single-process user never touches torch.distributed.

A linear layer's forward is split into ``input_collective -> local_forward -> output_collective``. LoRA adds its
own partial product between the first two steps, and quantized layers replace only ``local_forward``; neither
has to know which collective runs where.
"""
from __future__ import annotations

import atexit
import os
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llama import kernels
from llama.errors import UserError

# ---------------------------------------------------------------------------------------------------------------
# Process groups. World = data_parallel x model_parallel; ranks [k*mp, (k+1)*mp) form one model-parallel group.
# ---------------------------------------------------------------------------------------------------------------
_MP_GROUP: Optional[dist.ProcessGroup] = None
_MP_RANKS: List[int] = [0]
_DP_GROUP: Optional[dist.ProcessGroup] = None
_DP_RANKS: List[int] = [0]


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(backend: Optional[str] = None) -> None:
    """Start the default process group from torchrun's environment, if there is more than one process."""
    if dist.is_initialized() or world_size_from_env() == 1:
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    # We started the group, so we end it: a process that exits with gloo's threads still running aborts
    # ("terminate called without an active exception") after all its work is done.
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def initialize_model_parallel(model_parallel_size: int) -> None:
    """Create the model-parallel and data-parallel groups. Size 1 without a process group is a no-op."""
    global _MP_GROUP, _MP_RANKS, _DP_GROUP, _DP_RANKS
    world = dist.get_world_size() if dist.is_initialized() else 1
    if model_parallel_size < 1 or world % model_parallel_size != 0:
        raise UserError(
            f"model_parallel_size={model_parallel_size} must be >= 1 and divide the world size {world}; "
            f"launch with a multiple of {model_parallel_size} processes (torchrun --nproc_per_node N)"
        )
    if world == 1:
        _MP_GROUP, _MP_RANKS, _DP_GROUP, _DP_RANKS = None, [0], None, [0]
        return
    rank = dist.get_rank()
    # new_group must be called by every rank for every group, in the same order.
    for start in range(0, world, model_parallel_size):
        ranks = list(range(start, start + model_parallel_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            _MP_GROUP, _MP_RANKS = group, ranks
    for offset in range(model_parallel_size):
        ranks = list(range(offset, world, model_parallel_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            _DP_GROUP, _DP_RANKS = group, ranks


def model_parallel_is_initialized() -> bool:
    return _MP_GROUP is not None


def get_model_parallel_group() -> Optional[dist.ProcessGroup]:
    return _MP_GROUP


def get_model_parallel_world_size() -> int:
    return len(_MP_RANKS)


def get_model_parallel_rank() -> int:
    return _MP_RANKS.index(dist.get_rank()) if _MP_GROUP is not None else 0


def get_model_parallel_src_rank() -> int:
    """Global rank of this model-parallel group's first member (it decides sampled tokens)."""
    return _MP_RANKS[0]


def get_data_parallel_group() -> Optional[dist.ProcessGroup]:
    return _DP_GROUP


def get_data_parallel_world_size() -> int:
    return len(_DP_RANKS)


def get_data_parallel_rank() -> int:
    return _DP_RANKS.index(dist.get_rank()) if _DP_GROUP is not None else 0


def destroy_model_parallel() -> None:
    global _MP_GROUP, _MP_RANKS, _DP_GROUP, _DP_RANKS
    _MP_GROUP, _MP_RANKS, _DP_GROUP, _DP_RANKS = None, [0], None, [0]


# ---------------------------------------------------------------------------------------------------------------
# Autograd-aware collectives over the model-parallel group.
# ---------------------------------------------------------------------------------------------------------------
def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if get_model_parallel_world_size() == 1:
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, group=_MP_GROUP)
    return x


def _split_last_dim(x: torch.Tensor) -> torch.Tensor:
    ws = get_model_parallel_world_size()
    if ws == 1:
        return x
    return x.chunk(ws, dim=-1)[get_model_parallel_rank()].contiguous()


def _gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    ws = get_model_parallel_world_size()
    if ws == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(ws)]
    dist.all_gather(parts, x, group=_MP_GROUP)
    return torch.cat(parts, dim=-1)


class _CopyToModelParallelRegion(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient (every rank used the same input)."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad)


class _ReduceFromModelParallelRegion(torch.autograd.Function):
    """All-reduce forward (sum of partial products); identity backward."""

    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ScatterToModelParallelRegion(torch.autograd.Function):
    """Keep this rank's slice of the last dim; gather the gradient."""

    @staticmethod
    def forward(ctx, x):
        return _split_last_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last_dim(grad)


class _GatherFromModelParallelRegion(torch.autograd.Function):
    """Concatenate every rank's slice of the last dim; split the gradient."""

    @staticmethod
    def forward(ctx, x):
        return _gather_last_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _split_last_dim(grad)


def copy_to_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return x if get_model_parallel_world_size() == 1 else _CopyToModelParallelRegion.apply(x)


def reduce_from_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return x if get_model_parallel_world_size() == 1 else _ReduceFromModelParallelRegion.apply(x)


def scatter_to_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return x if get_model_parallel_world_size() == 1 else _ScatterToModelParallelRegion.apply(x)


def gather_from_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return x if get_model_parallel_world_size() == 1 else _GatherFromModelParallelRegion.apply(x)


# ---------------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------------
def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise UserError(
            f"{what} ({numerator}) is not divisible by the model parallel size ({denominator}); "
            f"choose a model parallel size that divides {numerator}"
        )
    return numerator // denominator


def _init_normal_(weight: torch.Tensor) -> None:
    if weight.device.type != "meta":
        with torch.no_grad():
            nn.init.normal_(weight, mean=0.0, std=0.02)


class ParallelLinear(nn.Module):
    """A bias-free linear layer holding this rank's shard of the weight along ``shard_dim``.

    ``forward(x) = output_collective(local_forward(input_collective(x)))``.
    """

    shard_dim: int  # 0 = output features split (column), 1 = input features split (row)

    def __init__(self, in_features: int, out_features: int, local_shape, *, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(local_shape, device=device, dtype=dtype))
        self.local_linear: Optional[nn.Module] = None
        _init_normal_(self.weight)

    def local_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.local_linear is not None:
            return self.local_linear(x)
        return kernels.linear(x, self.weight)

    def replace_local_linear(self, module: nn.Module) -> None:
        """Compute this rank's product with ``module`` (e.g. a quantized copy of ``self.weight``) and free the
        dense weight. The collectives stay as they are, so quantization composes with model parallelism."""
        self.local_linear = module
        self.weight = None

    def input_collective(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def output_collective(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_collective(self.local_forward(self.input_collective(x)))

    def extra_repr(self) -> str:
        local = tuple(self.weight.shape) if self.weight is not None else "replaced"
        return f"in_features={self.in_features}, out_features={self.out_features}, local={local}"


class ColumnParallelLinear(ParallelLinear):
    """Y = X W^T with W split along its output features; ``gather_output`` concatenates the slices."""

    shard_dim = 0

    def __init__(self, in_features: int, out_features: int, bias: bool = False, gather_output: bool = True,
                 *, device=None, dtype=None):
        if bias:
            raise ValueError("Llama 2 linears have no bias; bias=True is not supported")
        local_out = divide(out_features, get_model_parallel_world_size(), "output features")
        super().__init__(in_features, out_features, (local_out, in_features), device=device, dtype=dtype)
        self.gather_output = gather_output

    def input_collective(self, x: torch.Tensor) -> torch.Tensor:
        return copy_to_model_parallel_region(x)

    def output_collective(self, y: torch.Tensor) -> torch.Tensor:
        return gather_from_model_parallel_region(y) if self.gather_output else y


class RowParallelLinear(ParallelLinear):
    """Y = X W^T with W split along its input features; partial products are summed by an all-reduce."""

    shard_dim = 1

    def __init__(self, in_features: int, out_features: int, bias: bool = False, input_is_parallel: bool = False,
                 *, device=None, dtype=None):
        if bias:
            raise ValueError("Llama 2 linears have no bias; bias=True is not supported")
        local_in = divide(in_features, get_model_parallel_world_size(), "input features")
        super().__init__(in_features, out_features, (out_features, local_in), device=device, dtype=dtype)
        self.input_is_parallel = input_is_parallel

    def input_collective(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_is_parallel else scatter_to_model_parallel_region(x)

    def output_collective(self, y: torch.Tensor) -> torch.Tensor:
        return reduce_from_model_parallel_region(y)


class ParallelEmbedding(nn.Module):
    """Embedding table split along the embedding dim (as in Meta's checkpoints); outputs are all-gathered."""

    shard_dim = 1

    def __init__(self, num_embeddings: int, embedding_dim: int, *, device=None, dtype=None):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        local_dim = divide(embedding_dim, get_model_parallel_world_size(), "embedding dim")
        self.weight = nn.Parameter(torch.empty(num_embeddings, local_dim, device=device, dtype=dtype))
        _init_normal_(self.weight)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return gather_from_model_parallel_region(F.embedding(tokens, self.weight))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, local={tuple(self.weight.shape)}"


def shard_dim_of(name: str) -> Optional[int]:
    """Which dim of a Meta state_dict tensor is split across model-parallel ranks (None = replicated)."""
    leaf = name.rsplit(".", 2)[-2] if name.endswith(".weight") else name
    if leaf in ("wq", "wk", "wv", "w1", "w3", "output"):
        return 0
    if leaf in ("wo", "w2", "tok_embeddings"):
        return 1
    return None


__all__ = [
    "ColumnParallelLinear", "RowParallelLinear", "ParallelEmbedding", "ParallelLinear",
    "init_distributed", "initialize_model_parallel", "destroy_model_parallel", "model_parallel_is_initialized",
    "get_model_parallel_group", "get_model_parallel_world_size", "get_model_parallel_rank",
    "get_model_parallel_src_rank", "get_data_parallel_group", "get_data_parallel_world_size",
    "get_data_parallel_rank", "copy_to_model_parallel_region", "reduce_from_model_parallel_region",
    "scatter_to_model_parallel_region", "gather_from_model_parallel_region", "shard_dim_of", "divide",
]
