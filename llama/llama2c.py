"""llama2.c's legacy checkpoint format (version 0), read and written.

Layout (all little-endian): seven int32 ``dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len``
(a negative vocab_size means an unshared classifier is stored at the end), then fp32 arrays in this order:
token embedding; every layer's attention norm; every wq; wk; wv; wo; every ffn norm; every w1; w2; w3;
the final norm; the RoPE cos and sin tables (seq_len x head_dim/2 each); the classifier if unshared.
Weights are PyTorch (out, in) matrices written row-major, and llama2.c rotates adjacent pairs like Meta's code,
so tensors map onto Meta's names with no permutation.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from llama.checkpoint import CheckpointError
from llama.files import atomic_write
from llama.model import ffn_params_for, precompute_rope

HEADER = struct.Struct("<7i")
LLAMA2C_INFO = "llama2c.json"  # {"seq_len": N} beside a Meta folder converted from llama2.c (llama.convert llama2c)


def read_llama2c(path) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(params.json dict, Meta-named fp32 state_dict) from a llama2.c legacy ``.bin``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"llama2.c checkpoint {str(path)!r} not found")
    size = path.stat().st_size
    if size < HEADER.size:
        raise CheckpointError(f"{path} is {size} bytes, too short for a llama2.c header")
    with open(path, "rb") as f:
        dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = HEADER.unpack(f.read(HEADER.size))
    if min(dim, hidden_dim, n_layers, n_heads, n_kv_heads, seq_len) <= 0 or dim % n_heads or n_heads % n_kv_heads:
        raise CheckpointError(
            f"{path} does not start with a llama2.c version-0 header (read dim={dim}, hidden_dim={hidden_dim}, "
            f"n_layers={n_layers}, n_heads={n_heads}, n_kv_heads={n_kv_heads}); newer 'version 1/2' exports "
            f"start with a magic number and are not supported: export with legacy_export"
        )
    shared = vocab_size > 0
    vocab_size = abs(vocab_size)
    head_dim = dim // n_heads
    kv_dim = n_kv_heads * head_dim
    shapes = [
        ("tok_embeddings", (vocab_size, dim)),
        ("attention_norm", (n_layers, dim)),
        ("wq", (n_layers, dim, dim)),
        ("wk", (n_layers, kv_dim, dim)),
        ("wv", (n_layers, kv_dim, dim)),
        ("wo", (n_layers, dim, dim)),
        ("ffn_norm", (n_layers, dim)),
        ("w1", (n_layers, hidden_dim, dim)),
        ("w2", (n_layers, dim, hidden_dim)),
        ("w3", (n_layers, hidden_dim, dim)),
        ("norm", (dim,)),
        ("rope_cos", (seq_len, head_dim // 2)),
        ("rope_sin", (seq_len, head_dim // 2)),
    ]
    if not shared:
        shapes.append(("output", (vocab_size, dim)))
    expected = HEADER.size + 4 * sum(int(np.prod(s)) for _, s in shapes)
    if size != expected:
        raise CheckpointError(
            f"{path} is {size} bytes but its header (dim={dim}, layers={n_layers}, vocab={vocab_size}) implies "
            f"{expected}; the file is truncated or not a fp32 llama2.c legacy export"
        )
    data = np.fromfile(path, dtype="<f4", offset=HEADER.size)
    arrays, offset = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        arrays[name] = torch.from_numpy(data[offset : offset + n].reshape(shape).copy())
        offset += n

    # The stored RoPE tables must be the theta=10000 ones we compute, or the model would not run as trained.
    ours = precompute_rope(head_dim, seq_len, 10000.0)
    if not torch.allclose(arrays["rope_cos"], ours[..., 0], atol=1e-4):
        raise CheckpointError(f"{path} stores RoPE tables that differ from theta=10000; unsupported variant")

    state = {"tok_embeddings.weight": arrays["tok_embeddings"]}
    for i in range(n_layers):
        pre = f"layers.{i}."
        for name in ("wq", "wk", "wv", "wo"):
            state[pre + f"attention.{name}.weight"] = arrays[name][i]
        for name in ("w1", "w2", "w3"):
            state[pre + f"feed_forward.{name}.weight"] = arrays[name][i]
        state[pre + "attention_norm.weight"] = arrays["attention_norm"][i]
        state[pre + "ffn_norm.weight"] = arrays["ffn_norm"][i]
    state["norm.weight"] = arrays["norm"]
    # Meta's model never ties the classifier, so a shared one is stored as its own copy.
    state["output.weight"] = arrays["output"] if not shared else arrays["tok_embeddings"].clone()

    params = {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads,
              "vocab_size": vocab_size, **ffn_params_for(dim, hidden_dim), "norm_eps": 1e-5}
    # seq_len (the training context) is not written to params.json: Meta's Llama.build passes max_seq_len itself.
    return params, state


def llama2c_seq_len(path) -> int:
    """The training context length in a llama2.c file's header (the size of its stored rotary tables)."""
    with open(path, "rb") as f:
        return HEADER.unpack(f.read(HEADER.size))[6]


def recorded_seq_len(ckpt_dir) -> Optional[int]:
    """The llama2.c seq_len recorded in ``ckpt_dir/llama2c.json`` when the folder was converted from llama2.c (Meta's
    params.json has no context length), or None when there is no such file."""
    info = Path(ckpt_dir) / LLAMA2C_INFO
    if not info.is_file():
        return None
    try:
        seq_len = json.loads(info.read_text())["seq_len"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{info} should hold {{\"seq_len\": N}} ({e}); restore it, or delete it") from e
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise CheckpointError(f"{info}: seq_len is {json.dumps(seq_len)}, expected a positive whole number; "
                              f"correct it, or delete the file")
    return seq_len


def write_llama2c(path, params: dict, state: Dict[str, torch.Tensor], seq_len: Optional[int] = None) -> Path:
    """Write a llama2.c legacy fp32 ``.bin`` (atomically); the classifier is stored unshared unless it equals
    the embedding."""
    path = Path(path)
    dim, n_layers, n_heads = params["dim"], params["n_layers"], params["n_heads"]
    n_kv_heads = params.get("n_kv_heads") or n_heads
    emb, out = state["tok_embeddings.weight"], state["output.weight"]
    vocab_size = emb.shape[0]
    hidden_dim = state["layers.0.feed_forward.w1.weight"].shape[0]
    seq_len = seq_len or 2048
    shared = torch.equal(emb, out)
    rope = precompute_rope(dim // n_heads, seq_len, float(params.get("rope_theta", 10000.0)))

    def layers(name):
        return torch.stack([state[f"layers.{i}.{name}.weight"] for i in range(n_layers)])

    tensors = [emb, layers("attention_norm"), layers("attention.wq"), layers("attention.wk"),
               layers("attention.wv"), layers("attention.wo"), layers("ffn_norm"), layers("feed_forward.w1"),
               layers("feed_forward.w2"), layers("feed_forward.w3"), state["norm.weight"], rope[..., 0], rope[..., 1]]
    if not shared:
        tensors.append(out)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(HEADER.pack(dim, hidden_dim, n_layers, n_heads, n_kv_heads,
                                vocab_size if shared else -vocab_size, seq_len))
            for t in tensors:
                f.write(t.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes())

    return atomic_write(path, write)
