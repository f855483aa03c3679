"""Other CPU runtimes on the same weights, for ``bench_decode.py --peers``: llama.cpp (through llama-cpp-python, on a
GGUF file written by ``python -m llama.convert to_gguf``) and llama2.c's ``run`` (fp32) and ``runq`` (int8 weights
and int8 activations in groups of 64, "q8_0").

llama.cpp: ``pip install -e ".[bench]"`` (llama-cpp-python compiles llama.cpp for this CPU; several minutes).
llama2.c: build it yourself and pass the folder with ``--llama2c DIR`` (nothing of it is part of this project):

    git clone https://github.com/karpathy/llama2.c && cd llama2.c
    gcc -Ofast -march=native -fopenmp run.c -o run -lm && gcc -Ofast -march=native -fopenmp runq.c -o runq -lm

DIR must hold ``run``, ``runq`` and ``tokenizer.bin`` (its 32000-piece Llama 2 tokenizer, in the repository).
Every peer gets the same thread count as torch (``OMP_NUM_THREADS`` / ``n_threads``).
"""
from __future__ import annotations

import os
import re
import struct
import subprocess
import time
from pathlib import Path
from typing import Dict, Optional

import torch

from llama.checkpoint import write_checkpoint
from llama.llama2c import write_llama2c


def save_meta(model, folder: Path) -> Path:
    """The model's fp32 weights as a one-shard Meta folder (what the converters read)."""
    p = model.params
    params = {"dim": p.dim, "n_layers": p.n_layers, "n_heads": p.n_heads, "n_kv_heads": p.kv_heads,
              "vocab_size": p.vocab_size, "multiple_of": p.multiple_of, "ffn_dim_multiplier": p.ffn_dim_multiplier,
              "norm_eps": p.norm_eps, "rope_theta": p.rope_theta}
    state = model.state_dict()
    return write_checkpoint(folder, params, [iter((k, v.float()) for k, v in state.items())], fmt="safetensors")


# ----------------------------------------------------------------------------------------------- llama.cpp -----
def llama_cpp_available() -> Optional[str]:
    """None when llama-cpp-python and gguf import, else why not."""
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return f"{e.name} not installed (pip install -e \".[bench]\")"
    return None


def llama_cpp_rates(meta_dir: Path, tokenizer: Path, outtype: str, threads: int, prompt: int, steps: int,
                    prefill: int, repeat: int = 3) -> Dict[str, float]:
    """Seconds per decode token and per prefill of ``prefill`` tokens, batch 1, for llama.cpp on a GGUF export."""
    import llama_cpp
    from llama.convert import to_gguf

    gguf_path = meta_dir.parent / f"model-{outtype}.gguf"
    if not gguf_path.exists():
        to_gguf(str(meta_dir), str(gguf_path), outtype=outtype, tokenizer=str(tokenizer))
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=max(prefill, prompt + steps) + 8, n_batch=512,
                          n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False)
    ids = torch.randint(3, llm.n_vocab(), (max(prefill, prompt + steps),), generator=torch.Generator().manual_seed(0))
    ids = ids.tolist()

    def decode() -> float:
        llm.reset()
        llm.eval(ids[:prompt])
        t0 = time.perf_counter()
        for t in ids[prompt:prompt + steps]:
            llm.eval([t])
        return (time.perf_counter() - t0) / steps

    def prefill_once() -> float:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids[:prefill])
        return time.perf_counter() - t0

    decode(), prefill_once()  # warm-up
    out = {"decode": min(decode() for _ in range(repeat)), "prefill": min(prefill_once() for _ in range(repeat))}
    del llm
    return out


# ------------------------------------------------------------------------------------------------ llama2.c -----
def write_llama2c_q8(path: Path, model, group_size: int = 64) -> None:
    """runq.c's "version 2" file: header, fp32 norms, then every matrix as int8 with one fp32 scale per group of
    ``group_size`` consecutive values (scale = max|w| / 127), as llama2.c's export.py ``version2_export`` writes."""
    p, layers = model.params, model.layers
    state = model.state_dict()
    hidden = state["layers.0.feed_forward.w1.weight"].shape[0]
    weights = [state["tok_embeddings.weight"]] + [state[f"layers.{i}.{n}.weight"] for n in
                                                  ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                                                   "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
                                                  for i in range(len(layers))] + [state["output.weight"]]
    with open(path, "wb") as f:
        f.write(struct.pack("Ii", 0x616B3432, 2))
        f.write(struct.pack("iiiiiii", p.dim, hidden, p.n_layers, p.n_heads, p.kv_heads, p.vocab_size, p.max_seq_len))
        f.write(struct.pack("B", 0) + struct.pack("i", group_size))
        f.write(b"\0" * (256 - f.tell()))
        for name in ("attention_norm", "ffn_norm"):
            for i in range(len(layers)):
                f.write(state[f"layers.{i}.{name}.weight"].float().numpy().tobytes())
        f.write(state["norm.weight"].float().numpy().tobytes())
        for w in weights:
            groups = w.float().reshape(-1, group_size)
            scale = groups.abs().amax(1) / 127
            q = torch.round(groups / scale.clamp(min=1e-30)[:, None]).to(torch.int8)
            f.write(q.numpy().tobytes())
            f.write(scale.numpy().tobytes())


def llama2c_rate(binary: Path, model_bin: Path, tokenizer_bin: Path, steps: int, threads: int) -> float:
    """Seconds per token of ``run``/``runq`` (llama2.c's own "achieved tok/s", which excludes the first step)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    best = float("inf")
    for _ in range(3):
        proc = subprocess.run([str(binary), str(model_bin), "-z", str(tokenizer_bin), "-t", "0", "-n", str(steps),
                               "-i", "Once upon a time"], capture_output=True, text=True, env=env, timeout=600)
        m = re.search(r"achieved tok/s: ([0-9.]+)", proc.stderr)
        if not m:
            raise RuntimeError(f"{binary} printed no rate: {proc.stderr[-300:]}")
        best = min(best, 1 / float(m.group(1)))
    return best


def llama2c_rates(folder: Path, model, work: Path, steps: int, threads: int) -> Dict[str, float]:
    """{"run.c fp32": s/token, "runq.c q8_0": s/token} on this model's weights."""
    fp32, q8 = work / "model.bin", work / "model_q80.bin"
    if not fp32.exists():
        params = {"dim": model.params.dim, "n_layers": model.params.n_layers, "n_heads": model.params.n_heads,
                  "n_kv_heads": model.params.kv_heads, "rope_theta": model.params.rope_theta}
        write_llama2c(fp32, params, {k: v.float() for k, v in model.state_dict().items()},
                      seq_len=model.params.max_seq_len)
        write_llama2c_q8(q8, model)
    tok = folder / "tokenizer.bin"
    return {"run.c fp32": llama2c_rate(folder / "run", fp32, tok, steps, threads),
            "runq.c q8_0": llama2c_rate(folder / "runq", q8, tok, steps, threads)}
