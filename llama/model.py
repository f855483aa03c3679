"""The Llama 2 transformer, numerically and by parameter name the same as Meta's reference ``llama/model.py``.

Differences from Meta's file, none of them visible in the state_dict or the logits:
* the linears and the embedding are ``llama.parallel`` layers, which need no process group at model parallel size 1;
* rotary embedding uses real cos/sin tables (the same interleaved pairing as Meta's complex multiply);
* attention runs through ``scaled_dot_product_attention`` (grouped-query heads via ``enable_gqa``, no copies of the
  kv heads) and the KV cache is a non-persistent buffer written in place;
* ``forward(..., use_cache=False)`` skips the cache for training;
* ``decode_step`` is a static-shape single-token step (position as a tensor, fixed-size cache and mask) that
  ``torch.compile`` can capture once, with CUDA graphs on GPUs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

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
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    if torch.compiler.is_compiling():
        # Inductor generates no code for complex ops; the real form fuses into one kernel there instead.
        x0, x1 = xf[..., 0], xf[..., 1]
        cos, sin = rope[None, :, None, :, 0], rope[None, :, None, :, 1]
        return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(3).type_as(x)
    rc = torch.view_as_complex(rope)[None, :, None, :]
    return torch.view_as_real(torch.view_as_complex(xf) * rc).flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, *, device=None, dtype=None):
        super().__init__()
        ws = get_model_parallel_world_size()
        self.n_local_heads = divide(args.n_heads, ws, "n_heads")
        self.n_local_kv_heads = divide(args.kv_heads, ws, "n_kv_heads")
        if args.n_heads % args.kv_heads != 0:
            raise ValueError(f"n_heads ({args.n_heads}) must be a multiple of n_kv_heads ({args.kv_heads})")
        self.n_rep = self.n_local_heads // self.n_local_kv_heads
        self.head_dim = args.head_dim
        kw = dict(device=device, dtype=dtype)
        self.wq = ColumnParallelLinear(args.dim, args.n_heads * self.head_dim, gather_output=False, **kw)
        self.wk = ColumnParallelLinear(args.dim, args.kv_heads * self.head_dim, gather_output=False, **kw)
        self.wv = ColumnParallelLinear(args.dim, args.kv_heads * self.head_dim, gather_output=False, **kw)
        self.wo = RowParallelLinear(args.n_heads * self.head_dim, args.dim, input_is_parallel=True, **kw)
        # The KV cache is state, not a parameter: non-persistent, so it never enters the state_dict.
        cache_shape = (args.max_batch_size, args.max_seq_len, self.n_local_kv_heads, self.head_dim)
        self.register_buffer("cache_k", torch.zeros(cache_shape, **kw), persistent=False)
        self.register_buffer("cache_v", torch.zeros(cache_shape, **kw), persistent=False)

    def forward(self, x: torch.Tensor, start_pos, rope: torch.Tensor, mask: Optional[torch.Tensor],
                use_cache: bool = True) -> torch.Tensor:
        """``start_pos`` is an int (write and read cache[:, :start_pos + S]), or, for ``decode_step``, a 1-element
        long tensor: then the one new token is written with ``index_copy_`` and attention reads the whole
        fixed-size cache under ``mask``, so every step has the same shapes (what torch.compile / CUDA graphs need)."""
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_local_heads, self.head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, rope), apply_rotary_emb(xk, rope)

        if not use_cache:
            keys, values = xk, xv
        elif isinstance(start_pos, torch.Tensor):
            self.cache_k[:bsz].index_copy_(1, start_pos, xk)
            self.cache_v[:bsz].index_copy_(1, start_pos, xv)
            keys, values = self.cache_k[:bsz], self.cache_v[:bsz]
        else:
            self.cache_k[:bsz, start_pos : start_pos + seqlen] = xk
            self.cache_v[:bsz, start_pos : start_pos + seqlen] = xv
            keys = self.cache_k[:bsz, : start_pos + seqlen]
            values = self.cache_v[:bsz, : start_pos + seqlen]

        # (bsz, heads, seq, head_dim). Query head h reads kv head h // n_rep: contiguous groups, as Meta's repeat_kv;
        # enable_gqa does that inside the kernel instead of materialising n_rep copies of the keys and values.
        q, k, v = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        # No mask and several queries means the square causal case (see Transformer.causal_mask): is_causal lets
        # the kernel skip the masked half instead of reading a boolean mask.
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


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
            raise ValueError(f"vocab_size must be set (got {params.vocab_size}); take it from the tokenizer")
        if params.dim % params.n_heads != 0:
            raise ValueError(f"dim ({params.dim}) must be divisible by n_heads ({params.n_heads})")
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

    def init_buffers(self, device: torch.device, dtype: torch.dtype) -> None:
        """Allocate the rope table and KV caches on ``device``; used after loading weights into a meta model."""
        p = self.params
        self.rope = precompute_rope(p.head_dim, p.max_seq_len * 2, p.rope_theta, device=device)
        for layer in self.layers:
            attn = layer.attention
            shape = attn.cache_k.shape
            attn.cache_k = torch.zeros(shape, device=device, dtype=dtype)
            attn.cache_v = torch.zeros(shape, device=device, dtype=dtype)

    def check_bounds(self, bsz: int, start_pos: int, seqlen: int, use_cache: bool = True) -> None:
        p = self.params
        if start_pos + seqlen > p.max_seq_len:
            raise ValueError(
                f"positions up to {start_pos + seqlen} were asked for but max_seq_len is {p.max_seq_len}; "
                f"shorten the input or build with a larger max_seq_len"
            )
        if use_cache and bsz > p.max_batch_size:
            raise ValueError(
                f"a batch of {bsz} rows was given but max_batch_size is {p.max_batch_size}; "
                f"send fewer rows or build with a larger max_batch_size"
            )

    @staticmethod
    def causal_mask(seqlen: int, start_pos: int, device) -> Optional[torch.Tensor]:
        """(S, P+S) boolean mask: query i (at position P+i) sees keys 0..P+i. None when S == 1 (the one query
        sees everything) and when P == 0 (the square causal mask, which attention applies with is_causal)."""
        if seqlen == 1 or start_pos == 0:
            return None
        key_pos = torch.arange(start_pos + seqlen, device=device)
        query_pos = torch.arange(start_pos, start_pos + seqlen, device=device)
        return key_pos[None, :] <= query_pos[:, None]

    def hidden_states(self, tokens: torch.Tensor, start_pos: int = 0, *, use_cache: bool = True,
                      mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final-norm hidden states (bsz, seqlen, dim). ``mask`` overrides the causal mask (e.g. packed documents)."""
        bsz, seqlen = tokens.shape
        self.check_bounds(bsz, start_pos, seqlen, use_cache)
        h = self.tok_embeddings(tokens)
        rope = self.rope[start_pos : start_pos + seqlen]
        if mask is None:
            mask = self.causal_mask(seqlen, start_pos if use_cache else 0, tokens.device)
        for layer in self.layers:
            h = layer(h, start_pos, rope, mask, use_cache)
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, *, use_cache: bool = True,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """fp32 logits for every position. With the cache, S new tokens attend to the P = start_pos cached ones."""
        return self.output(self.hidden_states(tokens, start_pos, use_cache=use_cache, mask=mask)).float()

    def decode_step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One new token per row at position ``pos`` (a 1-element long tensor): fp32 logits (bsz, vocab).

        Shapes do not depend on the position (the cache is read whole, later positions masked off), so
        ``torch.compile`` traces it once per batch size and CUDA graphs can replay it. Same numbers as
        ``forward(tokens, int(pos))[:, -1]`` up to summation order. Bounds are the caller's job here
        (a Python check on a tensor would force a device sync every step).
        """
        h = self.tok_embeddings(tokens)
        rope = self.rope.index_select(0, pos)
        # Keys at positions <= pos are visible; the rest of the static cache is masked out.
        mask = torch.arange(self.params.max_seq_len, device=tokens.device)[None, :] <= pos[:, None]
        for layer in self.layers:
            h = layer(h, pos, rope, mask)
        return self.output(self.norm(h)[:, -1]).float()
