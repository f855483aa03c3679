"""Hand-written NF4 weights for QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs").

Storage layout of one quantized 2-D weight W (numel N, N % 64 == 0), chosen to match torchao's NF4Tensor
(torchao/dtypes/nf4tensor.py, later torchao/quantization/quantize_/workflows/nf4/nf4_tensor.py) bit for bit:

* W is flattened row-major and cut into N/64 blocks of 64 values. Each block is divided by its absmax, and
  each value becomes the index (0..15) of the nearest entry of NF4_CODE_BOOK.
* Codes are packed two per uint8 byte, the earlier element in the high nibble: [a, b] -> (a << 4) | b.
* Double quantization of the N/64 fp32 block absmaxes ("scales"): their mean is subtracted (it is stored as
  one fp32 number), and the centred scales are quantized to int8 in blocks of 256 with symmetric linear
  quantization: factor = 128 / absmax(block of centred scales), q = clamp(round(scale * factor), -128, 127),
  dequantized as q / factor + mean. The fp32 factor of each 256-block is stored. This is exactly torchao's
  scheme; note the factor is 128/absmax (not 127/absmax), so the largest positive centred scale of a block
  is clipped to 127/128 of the absmax (error <= absmax/128; every other scale <= absmax/256).
* If N/64 is not a multiple of 256, the last scale block is short: it is padded with zeros (centred scales)
  for the absmax, which leaves its absmax unchanged, and the padding is never stored. torchao instead
  requires N/64 % 256 == 0.

Storage per parameter: 4 (code) + 8/64 (int8 scale) + 32/(64*256) (fp32 factor) + 32/N (mean) bits,
which is about 4.127 bits for a 4096 x 4096 weight (see bits_per_parameter).

Quantization always runs in fp32 (a bf16/fp16 weight is upcast first). Nothing here uses bitsandbytes or
torchao at run time.
"""
import math
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from llama.quantize import register_quantizer

BLOCK_SIZE = 64  # values per absmax block
SCALE_BLOCK_SIZE = 256  # block absmaxes per int8 double-quantization block

# The 16 NF4 values of the QLoRA paper (bitsandbytes' table), written out in full: torchao rounds them to
# 4 decimals, which moves code boundaries and dequantized values by up to 5e-5 of a block absmax.
NF4_CODE_BOOK = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)

# Nearest-code search builds a (chunk, 16) distance matrix; this keeps it at 64 MiB.
_CHUNK = 1 << 20


class NF4Weight(NamedTuple):
    """The stored form of one NF4 weight; all tensors live on the weight's device."""

    packed_codes: torch.Tensor  # uint8 [N / 2], two 4-bit codes per byte, earlier element high
    quantized_scales: torch.Tensor  # int8 [N / 64], centred block absmaxes
    scale_factor: torch.Tensor  # fp32 [ceil(N / 64 / 256)], 128 / absmax of each block of centred scales
    scale_mean: torch.Tensor  # fp32 [], mean of the block absmaxes


def check_nf4_shape(shape: Tuple[int, ...]) -> None:
    """Raise a ValueError saying what to do when a weight of this shape cannot be stored as NF4."""
    numel = math.prod(shape)
    if len(shape) != 2:
        raise ValueError(f"NF4 quantizes 2-D weights; got shape {tuple(shape)}")
    if numel % BLOCK_SIZE != 0:
        raise ValueError(
            f"NF4 needs weight.numel() divisible by the block size {BLOCK_SIZE}; weight of shape "
            f"{tuple(shape)} has {numel} elements. Fix: make out_features * in_features a multiple of "
            f"{BLOCK_SIZE} (e.g. pad the dimension, or shard it differently), or keep this layer in full "
            f"precision (nn.Linear) instead of NF4Linear."
        )


def quantize_blocks(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Unpacked NF4 codes (uint8 [N], values 0..15) and fp32 block absmaxes ([N / 64]) of a weight."""
    flat = weight.detach().reshape(-1).float()
    blocks = flat.view(-1, BLOCK_SIZE)
    absmax = blocks.abs().amax(dim=1)
    # An all-zero block would divide 0 by 0; dividing by 1 maps it to the code of 0.0 instead.
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normalized = (blocks / safe.unsqueeze(1)).reshape(-1)
    code_book = NF4_CODE_BOOK.to(flat.device)
    codes = torch.empty(flat.numel(), dtype=torch.uint8, device=flat.device)
    for start in range(0, flat.numel(), _CHUNK):
        chunk = normalized[start : start + _CHUNK].unsqueeze(1)
        # Same distance/argmin as torchao (ties go to the lower index), so codes agree bit for bit.
        codes[start : start + _CHUNK] = (chunk - code_book).abs().min(dim=1).indices.to(torch.uint8)
    return codes, absmax


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the earlier element in the high nibble (torchao/bitsandbytes order)."""
    return (codes[0::2] << 4) | codes[1::2]


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_codes: uint8 [2 * len(packed)] codes."""
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)


def quantize_scales(absmax: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: (int8 centred scales [n], fp32 factor per 256-block, fp32 mean)."""
    n = absmax.numel()
    mean = absmax.mean()
    centred = absmax - mean
    n_scale_blocks = -(-n // SCALE_BLOCK_SIZE)
    # Zero padding of the last, short block does not change its absmax; it is dropped again below.
    padded = F.pad(centred, (0, n_scale_blocks * SCALE_BLOCK_SIZE - n)).view(n_scale_blocks, SCALE_BLOCK_SIZE)
    factor = 256 / (2 * padded.abs().amax(dim=1))  # written as torchao writes it, for identical rounding
    # A block of identical scales has absmax 0 (factor inf); any finite factor then gives q = 0 exactly.
    factor = torch.where(torch.isfinite(factor), factor, torch.ones_like(factor))
    quantized = (padded * factor.unsqueeze(1)).round().clamp(-128, 127).to(torch.int8)
    return quantized.reshape(-1)[:n].contiguous(), factor, mean


def dequantize_scales(quantized_scales: torch.Tensor, scale_factor: torch.Tensor, scale_mean: torch.Tensor) -> torch.Tensor:
    """fp32 block absmaxes [n] recovered from their int8 double-quantized form."""
    n = quantized_scales.numel()
    padded = F.pad(quantized_scales, (0, scale_factor.numel() * SCALE_BLOCK_SIZE - n))
    blocks = padded.view(-1, SCALE_BLOCK_SIZE) / scale_factor.unsqueeze(1)  # int8 / fp32 -> fp32
    return blocks.reshape(-1)[:n] + scale_mean


def quantize_nf4(weight: torch.Tensor) -> NF4Weight:
    """Quantize a 2-D weight (any local tensor, e.g. a model-parallel shard) to NF4 with double quantization."""
    check_nf4_shape(tuple(weight.shape))
    if not torch.isfinite(weight).all():
        raise ValueError(f"cannot quantize a weight of shape {tuple(weight.shape)} holding NaN or inf")
    codes, absmax = quantize_blocks(weight)
    quantized_scales, scale_factor, scale_mean = quantize_scales(absmax)
    return NF4Weight(pack_codes(codes), quantized_scales, scale_factor, scale_mean)


def dequantize_nf4(
    packed_codes: torch.Tensor,
    quantized_scales: torch.Tensor,
    scale_factor: torch.Tensor,
    scale_mean: torch.Tensor,
    shape: Tuple[int, ...],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The weight of the given shape, computed in fp32 (code value * dequantized scale), then cast to dtype."""
    values = NF4_CODE_BOOK.to(packed_codes.device)[unpack_codes(packed_codes).long()]
    scales = dequantize_scales(quantized_scales, scale_factor, scale_mean)
    weight = values.view(-1, BLOCK_SIZE) * scales.unsqueeze(1)
    return weight.view(shape).to(dtype)


class _NF4LinearFunction(torch.autograd.Function):
    """y = x @ W.T with W held as NF4. Only the packed buffers are saved; backward dequantizes again,
    so no full-size weight stays alive between forward and backward. W is frozen: no weight gradient."""

    @staticmethod
    def forward(ctx, x, packed_codes, quantized_scales, scale_factor, scale_mean, shape):
        ctx.shape = shape
        ctx.save_for_backward(packed_codes, quantized_scales, scale_factor, scale_mean)
        return F.linear(x, dequantize_nf4(packed_codes, quantized_scales, scale_factor, scale_mean, shape, x.dtype))

    @staticmethod
    def backward(ctx, grad_output):
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = dequantize_nf4(*ctx.saved_tensors, ctx.shape, grad_output.dtype)
            grad_x = grad_output.matmul(weight)  # (..., out) @ (out, in) -> (..., in)
        return grad_x, None, None, None, None, None


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored as NF4 buffers (not parameters).

    forward(x) = x @ dequantize(W).T (+ bias) in x's dtype. Build it with from_weight / from_linear; the
    plain constructor allocates empty buffers of the right sizes, e.g. to load_state_dict into. A bias, if
    any, is kept unquantized as a buffer. The weight is whatever local 2-D tensor it is given, so a
    model-parallel shard works as is (out_features/in_features are then the local sizes).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device: Optional[torch.device] = None,
        bias_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        check_nf4_shape((out_features, in_features))
        self.in_features = in_features
        self.out_features = out_features
        n_blocks = out_features * in_features // BLOCK_SIZE
        n_scale_blocks = -(-n_blocks // SCALE_BLOCK_SIZE)
        self.register_buffer("packed_codes", torch.zeros(out_features * in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("quantized_scales", torch.zeros(n_blocks, dtype=torch.int8, device=device))
        self.register_buffer("scale_factor", torch.ones(n_scale_blocks, dtype=torch.float32, device=device))
        self.register_buffer("scale_mean", torch.zeros((), dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> "NF4Linear":
        """Quantize a 2-D weight [out_features, in_features] (and keep an optional bias as is)."""
        check_nf4_shape(tuple(weight.shape))
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias=bias is not None, device=weight.device,
                    bias_dtype=bias.dtype if bias is not None else torch.float32)
        q = quantize_nf4(weight)
        layer.packed_codes.copy_(q.packed_codes)
        layer.quantized_scales.copy_(q.quantized_scales)
        layer.scale_factor.copy_(q.scale_factor)
        layer.scale_mean.copy_(q.scale_mean)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "NF4Linear":
        """Quantize an nn.Linear (or anything with .weight and .bias) into an NF4Linear."""
        return cls.from_weight(linear.weight, getattr(linear, "bias", None))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The [out_features, in_features] weight in dtype (fp32, bf16 or fp16)."""
        return dequantize_nf4(self.packed_codes, self.quantized_scales, self.scale_factor, self.scale_mean,
                              (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _NF4LinearFunction.apply(x, self.packed_codes, self.quantized_scales, self.scale_factor,
                                     self.scale_mean, (self.out_features, self.in_features))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def bits_per_parameter(module: Union[NF4Linear, nn.Module]) -> float:
    """Stored bits per quantized parameter: bytes of all buffers of every NF4Linear in module (codes,
    int8 scales, fp32 factors, mean, bias if any) * 8 / number of weight (and bias) entries they stand for."""
    layers = [m for m in module.modules() if isinstance(m, NF4Linear)]
    if not layers:
        raise ValueError(f"{type(module).__name__} holds no NF4Linear layer")
    n_bits = sum(b.numel() * b.element_size() * 8 for layer in layers for b in layer.buffers(recurse=False))
    n_params = sum(
        layer.in_features * layer.out_features + (layer.bias.numel() if layer.bias is not None else 0)
        for layer in layers
    )
    return n_bits / n_params


def register() -> None:
    """Make ``Llama.build(..., quantize="nf4")`` (and ``llama.quantize.quantize_model(model, "nf4")``) quantize to
    NF4: llama never imports kollama, so kollama adds the format through llama's documented hook."""
    register_quantizer("nf4", NF4Linear.from_weight)
