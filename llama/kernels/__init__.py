"""llama's own CPU kernels (``cpu.c``): fp32 small-batch products for decode, and int8 x int8 products.

Why our own. A decode step reads every weight once, so its speed is the rate at which the weights stream from
memory. PyTorch's CPU ``F.linear`` for one to a few activation rows (MKL's sgemv) reached about half the streaming
bandwidth on the machines we measured, and its int8 weight-only kernels were slower than fp32 (benchmarks/
RESULTS.md). ``f32_mm`` streams each weight row once for all (few) activation rows; ``q8_mm`` multiplies int8
weights by activations quantized to int8 per block of ``qblock()`` inputs with integer dot products (VNNI where the
CPU has it), for decode and prefill alike.

Building. ``cpu.c`` is compiled with the system C compiler (``$CC``, default gcc) and ``-march=native`` on first use
and cached by llama/kernel_cache.py (a private folder; only a library matching the digest of our own build is
loaded; the key includes the CPU's flags, so each machine gets code for its own instruction set — ``isa()`` says
which). Without a compiler, or when the cache is not private, ``available()`` is False after one warning and the
callers use torch's own ops; ``LLAMA_NO_KERNELS=1`` does the same on purpose. OpenMP threads =
``torch.get_num_threads()``; the library links the libgomp that torch has already loaded, so there is one thread
pool in the process.

Besides the products, a decode step's small ops (RMSNorm, rotary embedding, SiLU-gate, attention over the KV cache)
are one call each here: in torch each is several ops of a few microseconds, which add up to a large share of a
small model's step. The functions take and return torch tensors and do no autograd: callers use them only where no
gradient is needed (``fast``).
"""
from __future__ import annotations

import ctypes
import functools
import os
import subprocess
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from llama import kernel_cache

# Activation rows up to which ``linear`` uses f32_mm (and attention its kernel): decode batches and speculative
# verification (k + 1 rows). A prefill is compute bound, where MKL's blocked GEMM and SDPA's tiling win.
F32_MAX_ROWS = 16
# Multiply-adds below which a product runs on one thread: waking the thread team costs a few microseconds, as much
# as a small product itself.
SMALL_PRODUCT = 1 << 16
DISABLE_ENV = "LLAMA_NO_KERNELS"  # =1: torch's own ops everywhere (to compare, or to rule the kernels out)
_CFLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")

_LIB = None  # ctypes handle; False when the library cannot be built or its cache is not safe to load from
_LOCK = threading.Lock()  # one build per process, even when threads ask at once


def _library() -> Optional[ctypes.CDLL]:
    global _LIB
    with _LOCK:
        if _LIB is None:
            _LIB = os.environ.get(DISABLE_ENV, "") in ("", "0") and _build() or False
    return _LIB or None


def _build(cflags=_CFLAGS) -> Optional[ctypes.CDLL]:
    """Build (or take from the cache) and load cpu.c; tests pass other ``cflags`` (e.g. ``-mno-avx512f``) to run
    the code paths of other CPUs on this one."""
    source = (Path(__file__).parent / "cpu.c").read_text()
    try:
        lib = kernel_cache.load_library("llama_cpu", source, cflags)
    except kernel_cache.UnsafeCacheError as e:
        warnings.warn(f"llama's CPU kernels not used: {e}; torch's own products are used instead.")
        return None
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        warnings.warn(f"llama's CPU kernels could not be built ({str(detail)[:300]}); torch's own products are used "
                      f"instead (correct, slower at decode; int8 is then no faster than fp32). Install gcc or set CC.")
        return None
    ptr, i64, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.llama_kernel_isa.restype = ctypes.c_char_p
    lib.llama_kernel_qblock.restype = cint
    lib.f32_mm.restype = lib.bf16_mm.restype = None
    lib.f32_mm.argtypes = lib.bf16_mm.argtypes = [ptr, ptr, ptr, i64, i64, i64, cint]
    lib.q8_linear.restype = cint
    lib.q8_linear.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, cint]
    lib.rmsnorm.restype = lib.rope.restype = lib.silu_mul.restype = None
    lib.rmsnorm.argtypes = [ptr, ptr, ptr, i64, i64, ctypes.c_float]
    lib.rope.argtypes = [ptr, i64, ptr, ptr, i64, i64, i64, i64]
    lib.silu_mul.argtypes = [ptr, i64, ptr, i64, ptr, i64, i64]
    lib.attention.restype = cint
    lib.attention.argtypes = [ptr] * 4 + [i64] * 7 + [cint]
    lib.decode_layers.restype = cint
    lib.decode_layers.argtypes = [ptr, ptr, i64, ptr, ptr, i64, ptr]  # see llama/cpu_decode.py
    return lib


def available() -> bool:
    """Whether the kernels are built and loaded (builds them on the first call)."""
    return _library() is not None


def isa() -> str:
    """The instruction set the library was compiled for: avx512_vnni_bf16, avx512_vnni, avx512, avx2_vnni, avx2 or
    scalar ("none" when it is not built)."""
    lib = _library()
    return lib.llama_kernel_isa().decode() if lib else "none"


def qblock() -> int:
    """Inputs per activation scale in ``q8_mm``."""
    lib = _library()
    return lib.llama_kernel_qblock() if lib else 64


def _threads(work: int) -> int:
    return torch.get_num_threads() if work >= SMALL_PRODUCT else 1


def f32_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ w (N, K)^T, both fp32 on the CPU, w contiguous; for small M (decode)."""
    return _f32_mm(_library(), x, w)


def q8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) fp32 @ (q (N, K) int8 * scale (N,) fp32)^T, with x quantized to int8 per block of ``qblock()``
    inputs (scale = max|x| / 127 of the block, round half to even)."""
    return _q8_mm(_library(), x, q, scale)


def _f32_mm(lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    lib.f32_mm(x.data_ptr(), w.data_ptr(), y.data_ptr(), m, n, k, _threads(m * n * k))
    return y


def _bf16_mm(lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=torch.bfloat16)
    lib.bf16_mm(x.data_ptr(), w.data_ptr(), y.data_ptr(), m, n, k, _threads(m * n * k // 2))
    return y


def _q8_mm(lib: ctypes.CDLL, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    m, k = x.shape
    y = torch.empty(m, q.shape[0], dtype=torch.float32)
    if lib.q8_linear(x.data_ptr(), q.data_ptr(), scale.data_ptr(), y.data_ptr(), m, q.shape[0], k,
                     _threads(m * q.shape[0] * k)):
        raise MemoryError(f"no memory for the int8 activations of a ({m}, {k}) product")
    return y


def fast(*tensors: torch.Tensor, dtypes=(torch.float32,)) -> bool:
    """Whether the kernels may stand in for torch's ops on ``tensors``: all on the CPU in one of ``dtypes``, no
    autograd graph to record, not while torch.compile traces (it makes its own kernels), and the library built.
    (Called several times per layer and token: kept to attribute checks.)"""
    if _LIB is None:
        available()
    if not _LIB or torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t.dtype not in dtypes or t.device.type != "cpu" or (grad and t.requires_grad):
            return False
    return True


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w)`` (no bias), through ``f32_mm`` (fp32) or ``bf16_mm`` (bf16) where that is allowed
    (``fast``) and the faster path: at most F32_MAX_ROWS rows. Larger products (prefill) are torch's: MKL's
    blocked fp32 GEMM, and oneDNN's bf16 GEMM on CPUs with AMX or avx512_bf16."""
    if (x.numel() <= F32_MAX_ROWS * x.shape[-1] and w.is_contiguous() and x.dtype is w.dtype
            and fast(x, w, dtypes=(torch.float32, torch.bfloat16))):
        mm = _f32_mm if w.dtype is torch.float32 else _bf16_mm
        return mm(_LIB, x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[0])
    return F.linear(x, w)


def empty_huge(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor whose memory is advised for transparent huge pages (Linux ``madvise``), before
    anything touches it. Decode streams every weight once per token; with 2 MB pages instead of 4 KB the same
    product ran 25-40 % faster here (fewer TLB misses while streaming). Elsewhere, or when the kernel refuses, it is
    a plain ``torch.empty``."""
    t = torch.empty(shape, dtype=dtype)
    madvise = libc("madvise")
    if madvise is not None and t.nbytes >= 1 << 22:
        page = 1 << 21
        start = -(-t.data_ptr() // page) * page  # the whole 2 MB pages inside the tensor
        end = (t.data_ptr() + t.nbytes) // page * page
        if end > start:
            madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 14)  # MADV_HUGEPAGE
    return t


@functools.lru_cache(maxsize=None)
def libc(name: str):
    """A function of the C library on Linux (glibc's madvise, malloc_trim), or None where there is none."""
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return None
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


# The rest of a decode step. Callers check ``fast`` first: inputs are fp32 CPU tensors.

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    (_LIB or _library()).rmsnorm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // x.shape[-1],
                                 x.shape[-1], eps)
    return y


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as (rows, last dim) with unit stride along the last dim, a view where the strides allow (a slice of a
    stacked product does), else a copy."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rotary(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x (B, S, H, D) rotated by ``rope`` (S, D / 2, 2) as llama.model.apply_rotary_emb does."""
    b, s, h, d = x.shape
    x2, rope = _rows(x.reshape(b, s, h * d)), rope.contiguous()
    y = torch.empty(b, s, h, d, dtype=x.dtype)
    (_LIB or _library()).rope(x2.data_ptr(), x2.stride(0), rope.data_ptr(), y.data_ptr(), b, s, h, d)
    return y


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u, as the SwiGLU feed-forward computes it."""
    g2, u2 = _rows(g), _rows(u)
    y = torch.empty(g.shape, dtype=g.dtype)
    (_LIB or _library()).silu_mul(g2.data_ptr(), g2.stride(0), u2.data_ptr(), u2.stride(0), y.data_ptr(),
                                  g2.shape[0], g2.shape[1])
    return y


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start_pos: int) -> torch.Tensor:
    """Causal attention of q (B, S, H, D), at positions start_pos.., over the cached keys and values
    (B_max, T_max, KVH, D) of positions 0..start_pos+S-1; returns (B, S, H, D)."""
    q = q.contiguous()
    b, s, h, d = q.shape
    out = torch.empty_like(q)
    threads = torch.get_num_threads() if b * s * h * (start_pos + s) * d >= SMALL_PRODUCT else 1
    if (_LIB or _library()).attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), b, s,
                                      h, k_cache.shape[2], d, start_pos, k_cache.shape[1], threads):
        raise MemoryError("no memory for attention scores")
    return out


__all__ = ["available", "isa", "qblock", "fast", "linear", "empty_huge", "libc", "f32_mm", "q8_mm", "rms_norm", "rotary", "silu_mul",
           "attention", "F32_MAX_ROWS", "SMALL_PRODUCT"]
