"""Weight-only quantization for inference: int8 (per output channel) and int4 (groupwise).

Quantization happens after model-parallel sharding: each ``ParallelLinear`` keeps its collectives and swaps only
its local product through ``layer.replace_local_linear(Int8Linear.from_weight(layer.weight))``, so a quantized
model runs under torchrun exactly as a dense one.

Kernels. On the CPU an fp32 model's int8 linears use llama/kernels (``q8_mm``): the activations are quantized to
int8 per block of 64 inputs on the fly (as llama.cpp's q8_0 and llama2.c's runq.c do) and multiplied with integer
dot products (VNNI where the CPU has it), for decode and prefill alike; the kernel is registered as a torch custom
op so ``torch.compile`` can call it. Without a C compiler, or on CUDA, int8 falls back to weight-only
``F.linear(x, q.to(x.dtype)) * scale`` (which torch.compile fuses on CUDA). int4 uses PyTorch's tinygemm kernels on
both devices (``_weight_int4pack_mm`` on CUDA, ``_weight_int4pack_mm_for_cpu`` on CPU).
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, Union

import torch
import torch.nn.functional as F
from torch import nn

from llama import kernels
from llama.errors import UserError

# The kernel as a custom op, for torch.compile (opaque to the tracer). Eager code calls kernels.q8_mm directly:
# custom-op dispatch costs tens of microseconds per call, as much as a small model's whole product.
int8_weight_mm = torch.library.custom_op("llama::int8_weight_mm", kernels.q8_mm, mutates_args=())


@int8_weight_mm.register_fake
def _(x, q, scale):
    return x.new_empty(x.shape[0], q.shape[0])


class Int8Linear(nn.Module):
    """y = x (q * scale)^T with q int8 (N, K) and one fp scale per output channel (row).

    Symmetric per-row quantization: scale = max|w_row| / 127, q = round(w / scale); each weight is off by at
    most scale / 2, i.e. |w - q*scale| <= max|w_row| / 254. Through the CPU kernel the activations are rounded
    the same way per block of 64 inputs (off by at most max|x_block| / 254 each).
    """

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)
        self.in_features, self.out_features = weight_int8.shape[1], weight_int8.shape[0]
        # Decided once here, not per call: forward stays free of file and compiler work (and traceable).
        self.use_kernel = (weight_int8.device.type == "cpu" and scales.dtype == torch.float32
                           and kernels.available())

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> "Int8Linear":
        q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
        # A few MB of rows at a time (each row is quantized on its own): the fp32 temporaries stay small while a
        # checkpoint is quantized as it loads, whatever the size of the weight.
        step = max(1, (1 << 22) // max(1, weight.shape[1]))
        for r in range(0, weight.shape[0], step):
            w = weight[r:r + step].detach().float()
            s = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # an all-zero row keeps scale > 0
            q[r:r + step] = torch.round(w / s[:, None]).clamp_(-127, 127)
            scales[r:r + step] = s
        return cls(q, scales.to(weight.dtype))

    def dequantize(self) -> torch.Tensor:
        return self.weight_int8.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        if self.use_kernel and x.dtype == torch.float32:
            mm = int8_weight_mm if torch.compiler.is_compiling() else kernels.q8_mm
            y = mm(x2, self.weight_int8, self.scales)
        else:
            y = F.linear(x2, self.weight_int8.to(x.dtype)) * self.scales
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def _int4_ops(device: torch.device):
    if device.type == "cuda":
        return torch.ops.aten._convert_weight_to_int4pack, torch.ops.aten._weight_int4pack_mm
    cpu_ops = ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu")
    if device.type == "cpu" and all(hasattr(torch.ops.aten, n) for n in cpu_ops):
        return tuple(getattr(torch.ops.aten, n) for n in cpu_ops)
    raise NotImplementedError(f"int4 needs CUDA or PyTorch's int4 CPU kernels (not in torch {torch.__version__} "
                              f"on {device.type}); use quantize='int8'")


class Int4Linear(nn.Module):
    """Groupwise asymmetric 4-bit weights in PyTorch's tinygemm layout.

    Each group of ``group_size`` inputs of a row has a scale and a zero: w ~ (q - 8) * scale + zero, q in 0..15,
    scale = (max - min) / 15, zero = min + 8 * scale (so q = 0 is the group's minimum).
    """

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, shape):
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.group_size = group_size
        self.out_features, self.in_features = shape
        self._mm = _int4_ops(packed.device)[1]

    @staticmethod
    def quantize_groups(weight: torch.Tensor, group_size: int):
        n, k = weight.shape
        w = weight.detach().float().reshape(n, k // group_size, group_size)
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-6)
        q = torch.round((w - lo) / scale).clamp_(0, 15).to(torch.int32).reshape(n, k)
        zero = lo + 8 * scale
        return q, scale.squeeze(-1), zero.squeeze(-1)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, group_size: int = 128, inner_k_tiles: int = 8) -> "Int4Linear":
        n, k = weight.shape
        if k % group_size != 0 or group_size not in (32, 64, 128, 256):
            raise UserError(f"int4 needs in_features ({k}) divisible by group_size ({group_size}), and group_size "
                             f"one of 32, 64, 128, 256; pass another group_size or use int8")
        if weight.device.type == "cuda" and (k % (inner_k_tiles * 16) != 0 or n % 8 != 0):
            raise UserError(f"CUDA int4 needs in_features % {inner_k_tiles * 16} == 0 and out_features % 8 == 0, "
                             f"got {(n, k)}; use int8 for this model")
        if weight.device.type == "cpu" and n % 16 != 0:
            raise UserError(f"CPU int4 needs out_features % 16 == 0, got {n}; use int8 for this model")
        convert, _ = _int4_ops(weight.device)
        q, scale, zero = cls.quantize_groups(weight, group_size)
        if weight.device.type == "cuda":
            # CUDA packs two 4-bit values per byte (even column in the high nibble) before the tile shuffle, and
            # computes in bf16.
            packed = convert((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), inner_k_tiles)
            dtype = torch.bfloat16
        else:
            packed = convert(q.contiguous(), 2)
            dtype = weight.dtype
        sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)  # (k / group, n, 2)
        return cls(packed, sz, group_size, (n, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        y = self._mm(x2.to(self.scales_and_zeros.dtype), self.packed, self.group_size, self.scales_and_zeros)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group={self.group_size}"


# name -> factory(weight) returning a local linear module. Other packages add formats through register_quantizer,
# called explicitly (kollama.adapters.nf4.register() adds "nf4"), never as a side effect of importing a module.
QUANTIZERS: Dict[str, Callable[..., nn.Module]] = {"int8": Int8Linear.from_weight, "int4": Int4Linear.from_weight}


def register_quantizer(name: str, from_weight: Callable[..., nn.Module]) -> None:
    """The hook for other packages: make ``quantize=name`` build each local linear with ``from_weight(weight)``."""
    QUANTIZERS[name] = from_weight


def quantizer(mode: Union[str, Callable[..., nn.Module]], group_size: int = 128) -> Callable[..., nn.Module]:
    """The factory ``weight -> local linear module`` of a registered name ("int8", "int4", "nf4" once
    kollama.adapters.nf4.register() ran) or of a factory given as is."""
    if callable(mode):
        return mode
    if mode in QUANTIZERS:
        factory = QUANTIZERS[mode]
        return functools.partial(factory, group_size=group_size) if mode == "int4" else factory
    if mode == "nf4":
        raise UserError("quantize='nf4' is provided by kollama: use kollama.inference.build(..., quantize='nf4'), "
                        "or call kollama.adapters.nf4.register() once (or pass "
                        "quantize=kollama.adapters.nf4.NF4Linear.from_weight)")
    raise UserError(f"unknown quantize mode {mode!r}; choose one of {sorted(QUANTIZERS)} (or None)")


def quantized_layer(model: nn.Module, param_name: str, include_output: bool = True):
    """The ParallelLinear whose weight ``param_name`` is (e.g. "layers.0.attention.wq.weight"), when quantization
    replaces it; else None."""
    from llama.parallel import ParallelLinear  # local: llama.parallel imports nothing from here

    path, _, leaf = param_name.rpartition(".")
    if leaf != "weight" or (path == "output" and not include_output):
        return None
    layer = model.get_submodule(path)
    return layer if isinstance(layer, ParallelLinear) and layer.weight is not None else None


def quantize_model(model: nn.Module, mode: Union[str, Callable[..., nn.Module]], *, include_output: bool = True,
                   group_size: int = 128) -> nn.Module:
    """Replace every ParallelLinear's local product by a quantized one, in place, one layer at a time (so the
    dense weights are freed as we go). Call after loading this rank's shard (``llama.load_model(..., quantize=)``
    does it while loading, so the dense model never exists). ``mode``: see ``quantizer``.
    ``include_output=False`` keeps the classifier dense (it is the largest single matrix, and the most sensitive)."""
    factory = quantizer(mode, group_size)
    for name, _ in list(model.named_parameters()):
        layer = quantized_layer(model, name, include_output)
        if layer is not None:
            with torch.no_grad():
                layer.replace_local_linear(factory(layer.weight))
    return model


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers except the KV caches and the rope table (what a decode step reads)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for name, b in model.named_buffers():
        if not name.endswith(("cache.k", "cache.v", "rope")):
            total += b.numel() * b.element_size()
    return total


__all__ = ["Int8Linear", "Int4Linear", "quantize_model", "quantizer", "quantized_layer", "quantized_bytes",
           "register_quantizer", "QUANTIZERS"]
