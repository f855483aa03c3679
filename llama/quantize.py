"""Weight-only quantization for inference: int8 (per output channel) and int4 (groupwise).

Quantization happens after model-parallel sharding: each ``ParallelLinear`` keeps its collectives and swaps only
its local product through ``layer.replace_local_linear(Int8Linear.from_weight(layer.weight))``, so a quantized
model runs under torchrun exactly as a dense one.

Kernels. Decode is a matrix-vector product, bound by reading the weights, so int8 should be ~4x less traffic
than fp32. PyTorch 2.13's own CPU kernels for this are slower than the fp32 GEMV on the machine we measured
(``torch._weight_int8pack_mm`` and ``_weight_int4pack_mm_for_cpu``: see benchmarks/RESULTS.md), so for int8 on
CPU a small C kernel (AVX-512 / AVX2, OpenMP) is compiled with the system C compiler on first use and cached
(llama/kernel_cache.py: only from a private folder, and only a library matching the digest of our own build is
loaded); it is registered as a torch custom op so ``torch.compile`` can call it. Without a C compiler, or on CUDA,
int8 falls back to ``F.linear(x, q.to(x.dtype)) * scale`` (which torch.compile fuses on CUDA). int4 uses PyTorch's
tinygemm kernels on both devices (``_weight_int4pack_mm`` on CUDA, ``_weight_int4pack_mm_for_cpu`` on CPU).
"""
from __future__ import annotations

import ctypes
import functools
import subprocess
import threading
import warnings
from typing import Callable, Dict, Union

import torch
import torch.nn.functional as F
from torch import nn

from llama import kernel_cache
from llama.errors import UserError

# Rows of activations up to which the int8 kernel is used; above it (prefill) the product is compute bound and
# dequantizing the weight once for a BLAS GEMM is faster.
KERNEL_MAX_ROWS = 32
SMALL_PRODUCT = 1 << 18  # multiply-adds below which the kernel runs single-threaded

_C_SOURCE = r"""
#include <stdint.h>
#include <immintrin.h>
/* y[m, n] = scale[n] * sum_k x[m, k] * q[n, k]; x (M, K) fp32, q (N, K) int8, y (M, N) fp32, all row-major.
   Each weight row is read from memory once and converted once per 4 activation rows. */
static void rows4(const float* x, int64_t M, int64_t K, const int8_t* q, float* acc) {
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    int64_t mb = M - m0 < 4 ? M - m0 : 4, k = 0;
    const float* xr = x + m0 * K;
    float s[4] = {0.f, 0.f, 0.f, 0.f};
#if defined(__AVX512F__)
    __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (; k + 16 <= K; k += 16) {
      __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + k))));
      for (int64_t i = 0; i < mb; i++) a[i] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + i * K + k), w, a[i]);
    }
    for (int64_t i = 0; i < mb; i++) s[i] = _mm512_reduce_add_ps(a[i]);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (; k + 8 <= K; k += 8) {
      __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(q + k))));
      for (int64_t i = 0; i < mb; i++) a[i] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + i * K + k), w, a[i]);
    }
    for (int64_t i = 0; i < mb; i++) {
      float t[8]; _mm256_storeu_ps(t, a[i]);
      for (int j = 0; j < 8; j++) s[i] += t[j];
    }
#endif
    for (; k < K; k++)
      for (int64_t i = 0; i < mb; i++) s[i] += xr[i * K + k] * (float)q[k];
    for (int64_t i = 0; i < mb; i++) acc[m0 + i] = s[i];
  }
}
void int8_mm(const float* x, const int8_t* q, const float* scale, float* y, int64_t M, int64_t N, int64_t K,
             int threads) {
  /* dynamic chunks: on a shared machine one preempted thread must not hold the others back */
  #pragma omp parallel for schedule(dynamic, 32) num_threads(threads)
  for (int64_t n = 0; n < N; n++) {
    float acc[64];
    for (int64_t m0 = 0; m0 < M; m0 += 64) {
      int64_t mb = M - m0 < 64 ? M - m0 : 64;
      rows4(x + m0 * K, mb, K, q + n * K, acc);
      for (int64_t i = 0; i < mb; i++) y[(m0 + i) * N + n] = acc[i] * scale[n];
    }
  }
}
"""

_LIB = None  # ctypes handle, False when the kernel could not be built or its cache is not safe to load from
_LIB_LOCK = threading.Lock()  # one build per process, even when threads quantize at once
_CFLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


def _load_kernel():
    """Compile (once per machine, cached: llama/kernel_cache.py) and load the int8 CPU kernel; None when it cannot
    be built or the cache is not private (one warning says why)."""
    global _LIB
    with _LIB_LOCK:
        if _LIB is None:
            try:
                lib = kernel_cache.load_library("int8_mm", _C_SOURCE, _CFLAGS)
                lib.int8_mm.restype = None
                lib.int8_mm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
                _LIB = lib
            except kernel_cache.UnsafeCacheError as e:
                warnings.warn(f"int8 CPU kernel not used: {e}; int8 falls back to dequantize + matmul.")
                _LIB = False
            except (OSError, subprocess.SubprocessError) as e:
                detail = getattr(e, "stderr", "") or e
                warnings.warn(f"the int8 CPU kernel could not be built ({str(detail)[:300]}); int8 falls back to "
                              f"dequantize + matmul, which is correct but not faster than fp32. Install gcc (or set "
                              f"CC).")
                _LIB = False
    return _LIB or None


def _int8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) fp32 @ (q (N, K) int8 * scale (N,))^T on CPU with the C kernel."""
    x = x.contiguous()
    y = torch.empty(x.shape[0], q.shape[0], dtype=torch.float32)
    # Waking a thread team costs more than a small product itself (tens of microseconds): small ones run on one.
    threads = torch.get_num_threads() if q.numel() * x.shape[0] >= SMALL_PRODUCT else 1
    _load_kernel().int8_mm(x.data_ptr(), q.data_ptr(), scale.data_ptr(), y.data_ptr(), x.shape[0], q.shape[0],
                           x.shape[1], threads)
    return y


# The same function as a custom op, for torch.compile (opaque to the tracer). Eager code calls _int8_mm directly:
# custom-op dispatch costs tens of microseconds per call, as much as a small model's whole product.
int8_weight_mm = torch.library.custom_op("llama::int8_weight_mm", _int8_mm, mutates_args=())


@int8_weight_mm.register_fake
def _(x, q, scale):
    return x.new_empty(x.shape[0], q.shape[0])


class Int8Linear(nn.Module):
    """y = x (q * scale)^T with q int8 (N, K) and one fp scale per output channel (row).

    Symmetric per-row quantization: scale = max|w_row| / 127, q = round(w / scale); each weight is off by at
    most scale / 2, i.e. |w - q*scale| <= max|w_row| / 254.
    """

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)
        self.in_features, self.out_features = weight_int8.shape[1], weight_int8.shape[0]
        # Decided once here, not per call: forward stays free of file and compiler work (and traceable).
        self.use_kernel = weight_int8.device.type == "cpu" and _load_kernel() is not None

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> "Int8Linear":
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # an all-zero row keeps scale > 0
        q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(q.contiguous(), scales.to(weight.dtype))

    def dequantize(self) -> torch.Tensor:
        return self.weight_int8.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        if self.use_kernel and x.dtype == torch.float32 and x2.shape[0] <= KERNEL_MAX_ROWS:
            mm = int8_weight_mm if torch.compiler.is_compiling() else _int8_mm
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
# called explicitly (kollama.nf4.register() adds "nf4"), never as a side effect of importing a module.
QUANTIZERS: Dict[str, Callable[..., nn.Module]] = {"int8": Int8Linear.from_weight, "int4": Int4Linear.from_weight}


def register_quantizer(name: str, from_weight: Callable[..., nn.Module]) -> None:
    """The hook for other packages: make ``quantize=name`` build each local linear with ``from_weight(weight)``."""
    QUANTIZERS[name] = from_weight


def quantize_model(model: nn.Module, mode: Union[str, Callable[..., nn.Module]], *, include_output: bool = True,
                   group_size: int = 128) -> nn.Module:
    """Replace every ParallelLinear's local product by a quantized one, in place, one layer at a time (so the
    dense weights are freed as we go). Call after loading this rank's shard. ``mode`` is a registered name
    ("int8", "int4", "nf4" once kollama.nf4.register() ran) or a factory ``weight -> module``.
    ``include_output=False`` keeps the classifier dense (it is the largest single matrix, and the most sensitive)."""
    from llama.parallel import ParallelLinear  # local: llama.parallel imports nothing from here

    if callable(mode):
        factory = mode
    elif mode in QUANTIZERS:
        factory = QUANTIZERS[mode]
        if mode == "int4":
            factory = functools.partial(factory, group_size=group_size)
    elif mode == "nf4":
        raise UserError("quantize='nf4' is provided by kollama: use kollama.inference.build(..., quantize='nf4'), "
                         "or call kollama.nf4.register() once (or pass quantize=kollama.nf4.NF4Linear.from_weight)")
    else:
        raise UserError(f"unknown quantize mode {mode!r}; choose one of {sorted(QUANTIZERS)} (or None)")
    for name, layer in model.named_modules():
        if not isinstance(layer, ParallelLinear) or layer.weight is None:
            continue
        if name.split(".")[0] == "output" and not include_output:
            continue
        with torch.no_grad():
            q = factory(layer.weight)
        layer.replace_local_linear(q)
    return model


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers except the KV caches and the rope table (what a decode step reads)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for name, b in model.named_buffers():
        if not name.endswith(("cache.k", "cache.v", "rope")):
            total += b.numel() * b.element_size()
    return total


__all__ = ["Int8Linear", "Int4Linear", "quantize_model", "quantized_bytes", "register_quantizer", "QUANTIZERS"]
