"""The Llama 2 transformer, numerically and by parameter name the same as Meta's reference ``llama/model.py``.

Differences from Meta's file, none of them visible in the state_dict, and in the logits at most as float rounding:
* the linears and the embedding are ``llama.parallel`` layers, which need no process group at model parallel size 1;
* rotary embedding uses real cos/sin tables (the same interleaved pairing as Meta's complex multiply);
* attention runs through ``scaled_dot_product_attention`` (grouped-query heads via ``enable_gqa``, no copies of the
  kv heads) and the KV cache of each layer is a ``KVCache`` (preallocated, written in place, rolled back by
  writing from an earlier position);
* one trunk (``hidden_states``) serves prefill, chunked prefill and decode; ``forward(..., use_cache=False)`` skips
  the cache for training; a tensor ``start_pos`` gives the static-shape single-token step (fixed-size cache and
  mask) that ``torch.compile`` can capture once, with CUDA graphs on GPUs;
* on the CPU at inference in fp32, the small products, RMSNorm, rotary embedding, SiLU-gate and attention over the
  cache run in llama/kernels (the same formulas, one call each instead of several torch ops), and a batch-1 decode
  step may run every layer in one call (``cpu_decoder``, llama/cpu_decode.py); ``LLAMA_NO_KERNELS=1`` turns both off.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from llama import kernels
from llama.errors import UserError
from llama.parallel import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    divide,
    get_model_parallel_world_size,
)


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1  # Meta's params.json says -1: the tokenizer decides
    multiple_of: int = 256  # make SwiGLU hidden layer size a multiple of a large power of 2
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_batch_size: int = 32
    max_seq_len: int = 2048

    @classmethod
    def field_names(cls) -> set:
        return {f.name for f in fields(cls)}

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_hidden_dim(self) -> int:
        return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """SwiGLU width: 2/3 of 4*dim, times the optional multiplier, rounded up to ``multiple_of``."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def ffn_params_for(dim: int, hidden_dim: int) -> dict:
    """multiple_of / ffn_dim_multiplier that make Meta's FFN-width formula give ``hidden_dim`` (for params.json
    written from llama2.c or HF configs, which store the width itself). Meta's own choices are tried first, so a
    70B config gives Meta's (4096, 1.3)."""
    for multiplier in (None, 1.3):
        for multiple_of in (4096, 1024, 256, 128, 64, 32, 16, 8, 4, 2, 1):
            if ffn_hidden_dim(dim, multiple_of, multiplier) == hidden_dim:
                return {"multiple_of": multiple_of, "ffn_dim_multiplier": multiplier}
    base = int(2 * (4 * dim) / 3)
    multiplier = hidden_dim / base
    # int(multiplier * base) may land one below hidden_dim through rounding; nudge up one ulp at a time.
    while int(multiplier * base) < hidden_dim:
        multiplier = math.nextafter(multiplier, math.inf)
    if ffn_hidden_dim(dim, 1, multiplier) != hidden_dim:
        raise ValueError(f"no ffn_dim_multiplier reproduces hidden_dim={hidden_dim} for dim={dim}")
    return {"multiple_of": 1, "ffn_dim_multiplier": multiplier}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, *, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.fast(x, self.weight):  # fp32 CPU inference: one call instead of seven ops
            return kernels.rms_norm(x, self.weight, self.eps)
        # fp32 statistics, cast back, then scale: the order matters for bf16/fp16 equality with Meta.
        return self._norm(x.float()).type_as(x) * self.weight


def precompute_rope(head_dim: int, end: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    """cos and sin of position * frequency, shape (end, head_dim // 2, 2), in fp32."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    t = torch.arange(end, device=device, dtype=torch.float32)
    angles = torch.outer(t, freqs)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rotary_emb(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) by position-dependent angles (Meta's interleaved layout).

    x: (batch, seq, heads, head_dim); rope: (seq, head_dim // 2, 2) holding (cos, sin).
    One complex multiply, as Meta's code, instead of the equivalent real arithmetic: (x0 + i x1)(cos + i sin) =
    (x0 cos - x1 sin) + i (x0 sin + x1 cos). It is one kernel instead of seven, which matters per decode step.
    """
    if kernels.fast(x):
        return kernels.rotary(x, rope)
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    if torch.compiler.is_compiling():
        # Inductor generates no code for complex ops; the real form fuses into one kernel there instead.
        x0, x1 = xf[..., 0], xf[..., 1]
        cos, sin = rope[None, :, None, :, 0], rope[None, :, None, :, 1]
        return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(3).type_as(x)
    rc = torch.view_as_complex(rope)[None, :, None, :]
    return torch.view_as_real(torch.view_as_complex(xf) * rc).flatten(3).type_as(x)


class KVCache(nn.Module):
    """Keys and values of past positions for one attention layer, allocated once: (max_batch_size, max_seq_len,
    local kv heads, head_dim). Non-persistent buffers, so the cache never enters the state_dict.

    Positions belong to the caller: ``update(start_pos, k, v)`` writes positions start_pos.. and returns the keys and
    values of positions 0..start_pos+S-1, so a later forward from an earlier ``start_pos`` rolls the cache back
    (speculative decoding does this with rejected tokens); ``truncate(n)`` also clears what lies beyond n, so a
    stale entry cannot be read by mistake. A 1-element tensor ``start_pos`` (the static-shape decode step that
    torch.compile and CUDA graphs need) writes one position with ``index_copy_`` and returns the whole cache; the
    caller masks the positions after it."""

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, *, device=None,
                 dtype=None):
        super().__init__()
        shape = (max_batch_size, max_seq_len, n_kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, start_pos, xk: torch.Tensor, xv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        bsz, seqlen = xk.shape[:2]
        if isinstance(start_pos, torch.Tensor):
            self.k[:bsz].index_copy_(1, start_pos, xk)
            self.v[:bsz].index_copy_(1, start_pos, xv)
            return self.k[:bsz], self.v[:bsz]
        self.k[:bsz, start_pos : start_pos + seqlen] = xk
        self.v[:bsz, start_pos : start_pos + seqlen] = xv
        return self.k[:bsz, : start_pos + seqlen], self.v[:bsz, : start_pos + seqlen]

    def truncate(self, n: int) -> None:
        self.k[:, n:].zero_()
        self.v[:, n:].zero_()

    def reset(self) -> None:
        self.truncate(0)

    def allocate(self, device: torch.device, dtype: torch.dtype) -> None:
        """Fresh zeroed tensors of the same shape on ``device`` (after a model was built on the meta device)."""
        self.k = torch.zeros(self.k.shape, device=device, dtype=dtype)
        self.v = torch.zeros(self.v.shape, device=device, dtype=dtype)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def causal_mask(seqlen: int, start_pos: int, device) -> Optional[torch.Tensor]:
    """(S, P+S) boolean mask: query i (at position P+i) sees keys 0..P+i. None when S == 1 (the one query sees
    everything) and when P == 0 (the square causal mask, which attention applies with is_causal)."""
    if seqlen == 1 or start_pos == 0:
        return None
    key_pos = torch.arange(start_pos + seqlen, device=device)
    query_pos = torch.arange(start_pos, start_pos + seqlen, device=device)
    return key_pos[None, :] <= query_pos[:, None]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, *, device=None, dtype=None):
        super().__init__()
        ws = get_model_parallel_world_size()
        self.n_local_heads = divide(args.n_heads, ws, "n_heads")
        self.n_local_kv_heads = divide(args.kv_heads, ws, "n_kv_heads")
        if args.n_heads % args.kv_heads != 0:
            raise UserError(f"n_heads ({args.n_heads}) must be a multiple of n_kv_heads ({args.kv_heads})")
        self.n_rep = self.n_local_heads // self.n_local_kv_heads
        self.head_dim = args.head_dim
        kw = dict(device=device, dtype=dtype)
        self.wq = ColumnParallelLinear(args.dim, args.n_heads * self.head_dim, gather_output=False, **kw)
        self.wk = ColumnParallelLinear(args.dim, args.kv_heads * self.head_dim, gather_output=False, **kw)
        self.wv = ColumnParallelLinear(args.dim, args.kv_heads * self.head_dim, gather_output=False, **kw)
        self.wo = RowParallelLinear(args.n_heads * self.head_dim, args.dim, input_is_parallel=True, **kw)
        self.cache = KVCache(args.max_batch_size, args.max_seq_len, self.n_local_kv_heads, self.head_dim, **kw)
        self.stacked_qkv = None  # wq|wk|wv as one product at inference (llama.fusion.stack_projections)

    def forward(self, x: torch.Tensor, start_pos, rope: torch.Tensor, mask: Optional[torch.Tensor],
                use_cache: bool = True) -> torch.Tensor:
        """``start_pos``: an int, or a 1-element long tensor for the static-shape decode step (see KVCache).
        ``mask``: None means causal (query i, at position start_pos + i, sees keys 0..start_pos + i)."""
        bsz, seqlen, _ = x.shape
        if self.stacked_qkv is not None and self.stacked_qkv.usable():
            xq, xk, xv = self.stacked_qkv(x)
        else:
            xq, xk, xv = self.wq(x), self.wk(x), self.wv(x)
        xq = xq.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        xk = xk.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xv = xv.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, rope), apply_rotary_emb(xk, rope)

        keys, values = self.cache.update(start_pos, xk, xv) if use_cache else (xk, xv)
        if mask is None and use_cache and isinstance(start_pos, int):
            if seqlen <= kernels.F32_MAX_ROWS and kernels.fast(xq, keys):
                # fp32 CPU decode (and short verification steps): one call over the cache, not SDPA's ~10 ops.
                out = kernels.attention(xq, self.cache.k, self.cache.v, start_pos)
                return self.wo(out.view(bsz, seqlen, -1))
            mask = causal_mask(seqlen, start_pos, x.device)  # None for one query, and from position 0

        # (bsz, heads, seq, head_dim). Query head h reads kv head h // n_rep: contiguous groups, as Meta's repeat_kv;
        # enable_gqa does that inside the kernel instead of materialising n_rep copies of the keys and values.
        q, k, v = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        # No mask and several queries is the square causal case (see causal_mask): is_causal lets the kernel skip
        # the masked half instead of reading a boolean mask.
        is_causal = mask is None and seqlen > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                             enable_gqa=self.n_rep > 1)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.w1 = ColumnParallelLinear(dim, hidden_dim, gather_output=False, **kw)
        self.w2 = RowParallelLinear(hidden_dim, dim, input_is_parallel=True, **kw)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, gather_output=False, **kw)
        self.stacked_w13 = None  # w1|w3 as one product at inference (llama.fusion.stack_projections)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stacked_w13 is not None and self.stacked_w13.usable():
            gate, up = self.stacked_w13(x)
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.w2(kernels.silu_mul(gate, up) if kernels.fast(gate, up) else F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.layer_id = layer_id
        self.attention = Attention(args, **kw)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim, **kw)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps, **kw)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps, **kw)

    def forward(self, x, start_pos, rope, mask, use_cache=True):
        h = x + self.attention(self.attention_norm(x), start_pos, rope, mask, use_cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Llama 2. ``Transformer(args, device=..., dtype=...)``; on the meta device nothing is allocated."""

    def __init__(self, params: ModelArgs, *, device=None, dtype=None):
        super().__init__()
        if params.vocab_size <= 0:
            raise UserError(f"vocab_size must be set (got {params.vocab_size}); take it from the tokenizer")
        if params.dim % params.n_heads != 0:
            raise UserError(f"dim ({params.dim}) must be divisible by n_heads ({params.n_heads})")
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers
        kw = dict(device=device, dtype=dtype)
        self.tok_embeddings = ParallelEmbedding(params.vocab_size, params.dim, **kw)
        self.layers = nn.ModuleList(TransformerBlock(i, params, **kw) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps, **kw)
        self.output = ColumnParallelLinear(params.dim, params.vocab_size, gather_output=True, **kw)
        # Twice max_seq_len positions, as Meta's table, so a slightly longer context does not index out of range.
        rope = precompute_rope(params.head_dim, params.max_seq_len * 2, params.rope_theta, device=device)
        self.register_buffer("rope", rope, persistent=False)
        self.cpu_decoder = None  # batch-1 CPU decode in one call, set for inference (llama.cpu_decode.CpuDecoder)

    def init_buffers(self, device: torch.device, dtype: torch.dtype) -> None:
        """Allocate the rope table and KV caches on ``device``; used after loading weights into a meta model."""
        p = self.params
        self.rope = precompute_rope(p.head_dim, p.max_seq_len * 2, p.rope_theta, device=device)
        for cache in self.kv_caches():
            cache.allocate(device, dtype)

    def kv_caches(self) -> List[KVCache]:
        return [layer.attention.cache for layer in self.layers]

    def check_bounds(self, bsz: int, start_pos: int, seqlen: int, use_cache: bool = True) -> None:
        p = self.params
        if start_pos + seqlen > p.max_seq_len:
            raise UserError(
                f"positions up to {start_pos + seqlen} were asked for but max_seq_len is {p.max_seq_len}; "
                f"shorten the input or build with a larger max_seq_len"
            )
        if use_cache and bsz > p.max_batch_size:
            raise UserError(
                f"a batch of {bsz} rows was given but max_batch_size is {p.max_batch_size}; "
                f"send fewer rows or build with a larger max_batch_size"
            )

    def hidden_states(self, tokens: torch.Tensor, start_pos: Union[int, torch.Tensor] = 0, *, use_cache: bool = True,
                      mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final-norm hidden states (bsz, seqlen, dim): the one trunk behind prefill, chunked prefill and decode.

        ``start_pos`` an int: S new tokens at positions start_pos.. attend to the cached ones before them (``mask``
        overrides the causal mask, e.g. for packed documents). ``start_pos`` a 1-element long tensor: one new token
        per row with shapes that do not depend on the position (the whole cache is read, later positions masked
        off), so ``torch.compile`` traces it once per batch size and CUDA graphs can replay it; its bounds are the
        caller's job (a Python check on a tensor would force a device sync every step)."""
        bsz, seqlen = tokens.shape
        if isinstance(start_pos, torch.Tensor):
            rope = self.rope.index_select(0, start_pos)
            mask = torch.arange(self.params.max_seq_len, device=tokens.device)[None, :] <= start_pos[:, None]
        else:
            self.check_bounds(bsz, start_pos, seqlen, use_cache)
            rope = self.rope[start_pos : start_pos + seqlen]
        h = self.tok_embeddings(tokens)
        if self.cpu_decoder is not None and bsz == seqlen == 1 and use_cache and mask is None \
                and isinstance(start_pos, int):
            out = self.cpu_decoder(h, start_pos)  # every layer in one C call (llama/cpu_decode.py), or None
            if out is not None:
                return self.norm(out)
        for layer in self.layers:
            h = layer(h, start_pos, rope, mask, use_cache)
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, start_pos: Union[int, torch.Tensor] = 0, *, use_cache: bool = True,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """fp32 logits for every position (see ``hidden_states`` for ``start_pos``)."""
        return self.output(self.hidden_states(tokens, start_pos, use_cache=use_cache, mask=mask)).float()
