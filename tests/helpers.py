"""Test helpers: tiny random models, a tiny SentencePiece tokenizer, and the reference transformers model.

The Meta -> HF weight mapping here is written from transformers' own conversion script
(convert_llama_weights_to_hf.py: ``w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2)``), independent
of anything in ``llama/``, so that tests compare our model against an implementation we did not write.
"""
from __future__ import annotations

import io
import os
import socket
from pathlib import Path
from typing import Dict, List

import torch

from llama.checkpoint import split_tensor, write_checkpoint
from llama.model import ModelArgs, Transformer

ENGLISH = [
    "Once upon a time there was a little girl who loved to play in the park with her red ball.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire.",
    "Tom and Sue went to the market to buy apples, bread, milk and a big green melon.",
    "In the morning the sun rose over the hills and the birds sang a happy song together.",
    "She said: I want to read a book about ships, stars, trains and old castles today!",
]

WORDS = " ".join(ENGLISH).replace(".", "").replace(",", "").replace("!", "").replace(":", "").split()


def short_lines(n: int) -> List[str]:
    """n short English lines of 4-9 words (several fit one packed block)."""
    return [" ".join(WORDS[(7 * i) % len(WORDS):][:4 + i % 6]) for i in range(n)]


def tiny_args(**overrides) -> ModelArgs:
    base = dict(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=128, multiple_of=16, norm_eps=1e-5,
                max_seq_len=64, max_batch_size=4)
    base.update(overrides)
    return ModelArgs(**base)


def random_model(args: ModelArgs, seed: int = 0, std: float = 0.2) -> Transformer:
    """A fp32 CPU model with weights large enough that every layer matters (norms around 1, not exactly 1)."""
    model = Transformer(args)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name == "tok_embeddings.weight":
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model.eval()


def randomize_lora(model, seed: int = 0, std: float = 0.05):
    """Non-zero B (and perturbed A), so both LoRA factors get gradients and a merge moves the weights."""
    from kollama.adapters.lora import lora_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_A.add_(std * torch.randn(m.lora_A.shape, generator=g))
            m.lora_B.copy_(std * torch.randn(m.lora_B.shape, generator=g))
    return model


def params_of(args: ModelArgs) -> dict:
    return {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
            "vocab_size": args.vocab_size, "multiple_of": args.multiple_of,
            "ffn_dim_multiplier": args.ffn_dim_multiplier, "norm_eps": args.norm_eps, "rope_theta": args.rope_theta}


def save_meta(model: Transformer, path, mp: int = 1, fmt: str = "pth", extra_files=()) -> Path:
    """Write ``model`` (built at model parallel size 1) as a Meta checkpoint of ``mp`` shards."""
    state = model.state_dict()
    shards: List[list] = [[] for _ in range(mp)]
    for name, t in state.items():
        for rank, piece in enumerate(split_tensor(name, t, mp)):
            shards[rank].append((name, piece))
    return write_checkpoint(path, params_of(model.params), (iter(s) for s in shards), fmt=fmt,
                            extra_files=extra_files)


def tiny_training_base(root: Path) -> tuple:
    """(tokenizer path, Meta checkpoint path, args) of the tiny base model the trainer tests fine-tune."""
    tok = train_tiny_tokenizer(root / "tok.model")
    args = tiny_args(dim=48, n_heads=4, n_kv_heads=2)
    base = save_meta(random_model(args, seed=1, std=0.1), root / "base")
    return tok, base, args


def train_tiny_tokenizer(path: Path, vocab_size: int = 128) -> Path:
    """A small BPE SentencePiece model (Llama's special ids: unk 0, bos 1, eos 2, no pad)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(ENGLISH * 20), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=True,
        minloglevel=2, num_threads=1,
    )
    path.write_bytes(buf.getvalue())
    return path


# ---------------------------------------------------------------------------------------------------------------
# transformers reference
# ---------------------------------------------------------------------------------------------------------------
def _permute_for_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def hf_row_order(n_rows: int, n_heads: int) -> torch.Tensor:
    """Index of the Meta row behind each HF row of wq/wk: ``hf_w == meta_w[hf_row_order(...)]``."""
    return _permute_for_hf(torch.arange(n_rows)[:, None], n_heads)[:, 0]


class RefLoRALinear(torch.nn.Module):
    """Reference LoRA around an HF projection: base(x) + scale * x A^T B^T, A (r, in) and B (out, r) in Meta row
    order; ``order`` (hf_row_order for q/k projections, arange otherwise) maps them to the HF rows."""

    def __init__(self, base: torch.nn.Linear, A: torch.Tensor, B: torch.Tensor, scale: float, order: torch.Tensor):
        super().__init__()
        self.base, self.scale = base, scale
        self.lora_A = torch.nn.Parameter(A.clone().float())
        self.lora_B = torch.nn.Parameter(B.clone().float())
        self.register_buffer("order", order, persistent=False)

    def forward(self, x):
        delta = (x @ self.lora_A.t()) @ self.lora_B.t()
        return self.base(x) + self.scale * delta[..., self.order]


def hf_state_dict(state: Dict[str, torch.Tensor], args: ModelArgs) -> Dict[str, torch.Tensor]:
    n_kv = args.n_kv_heads or args.n_heads
    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"],
           "lm_head.weight": state["output.weight"]}
    for i in range(args.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        out[q + "self_attn.q_proj.weight"] = _permute_for_hf(state[p + "attention.wq.weight"], args.n_heads)
        out[q + "self_attn.k_proj.weight"] = _permute_for_hf(state[p + "attention.wk.weight"], n_kv)
        out[q + "self_attn.v_proj.weight"] = state[p + "attention.wv.weight"]
        out[q + "self_attn.o_proj.weight"] = state[p + "attention.wo.weight"]
        out[q + "mlp.gate_proj.weight"] = state[p + "feed_forward.w1.weight"]
        out[q + "mlp.down_proj.weight"] = state[p + "feed_forward.w2.weight"]
        out[q + "mlp.up_proj.weight"] = state[p + "feed_forward.w3.weight"]
        out[q + "input_layernorm.weight"] = state[p + "attention_norm.weight"]
        out[q + "post_attention_layernorm.weight"] = state[p + "ffn_norm.weight"]
    return out


def hf_model(state: Dict[str, torch.Tensor], args: ModelArgs, hidden_dim: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads or args.n_heads, rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta, max_position_embeddings=args.max_seq_len * 2, tie_word_embeddings=False,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config)
    model.load_state_dict(hf_state_dict(state, args), strict=True)
    return model.float().eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_dist_env(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
