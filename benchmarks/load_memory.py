"""Peak memory of ``Llama.build(..., quantize="int8")`` against the int8 model it builds: the load quantizes each
weight as it is read (llama/loading.py), so the dense model should never be in memory.

    python benchmarks/load_memory.py [--shape 1.1B] [--fmt safetensors,pth] [--workdir DIR] [--out FILE]

A random fp32 checkpoint of TinyLlama's shape (dim 2048, 22 layers, GQA 32/4, FFN 5632, vocabulary 32000: 4.4 GB)
is written one tensor at a time, then each format is loaded in a fresh process that polls /proc/self/status every
2 ms during the build and reports the peaks above its own baseline (interpreter + torch + llama imported) of owned
memory (RssAnon), of file-backed memory (RssFile: pages of the checkpoint mapped while it is read, clean page cache
the kernel can drop) and of their sum, against the bytes of the int8 model (``quantized_bytes``: int8 matrices and
scales, the fp32 embedding and norms) and its KV cache (max_seq_len 256, batch 1). Target (issue 18): peak RSS <=
1.2 x (model + cache).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"1.1B": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000, multiple_of=256),
          "110M": dict(dim=768, n_layers=12, n_heads=12, vocab_size=32000, multiple_of=32)}


def make(path: Path, shape: str, fmt: str) -> None:
    """Write a random checkpoint one tensor at a time (each from its own seed), with a matching tokenizer size."""
    import torch

    from llama.checkpoint import write_checkpoint
    from llama.model import ModelArgs, Transformer

    args = ModelArgs(**SHAPES[shape])
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}

    def tensors():
        for i, (name, shp) in enumerate(shapes.items()):
            g = torch.Generator().manual_seed(i)
            yield name, (torch.ones(shp) if name.endswith("norm.weight") else torch.randn(shp, generator=g) * 0.02)

    params = {k: v for k, v in SHAPES[shape].items()}
    write_checkpoint(path, params, [tensors()], fmt=fmt)


def load(path: Path, tokenizer: str) -> dict:
    import threading
    import time

    import torch

    from llama import Llama
    from llama.quantize import quantized_bytes

    def status():
        with open("/proc/self/status") as f:
            return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)
                    if k in ("VmRSS", "RssAnon", "RssFile")}

    torch.zeros(1) @ torch.zeros(1)  # torch's lazy start-up counts as baseline
    base, peak, done = status(), {}, threading.Event()

    def poll():  # every 2 ms: the peaks of owned (RssAnon) and file-backed (RssFile) memory separately
        while not done.is_set():
            for k, v in status().items():
                peak[k] = max(peak.get(k, 0), v)
            time.sleep(0.002)

    thread = threading.Thread(target=poll)
    thread.start()
    llama = Llama.build(str(path), tokenizer, max_seq_len=256, max_batch_size=1, device="cpu", quantize="int8")
    done.set()
    thread.join()
    model = llama.model
    return {"rss": peak["VmRSS"] - base["VmRSS"], "anon": peak["RssAnon"] - base["RssAnon"],
            "file": peak["RssFile"] - base["RssFile"], "int8_model": quantized_bytes(model),
            "kv_cache": sum(c.nbytes for c in model.kv_caches())}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1.1B", choices=sorted(SHAPES), help="model shape (default 1.1B, 4.4 GB fp32)")
    ap.add_argument("--fmt", default="safetensors,pth", help="checkpoint formats to load, comma-separated")
    ap.add_argument("--workdir", default=None, help="where the checkpoints are written (default: a temp folder)")
    ap.add_argument("--out", default=None, help="append the Markdown table to this file (nothing written without)")
    ap.add_argument("--make", nargs=3, help=argparse.SUPPRESS)  # child: PATH SHAPE FMT
    ap.add_argument("--load", nargs=2, help=argparse.SUPPRESS)  # child: PATH TOKENIZER
    a = ap.parse_args()
    if a.make:
        return make(Path(a.make[0]), a.make[1], a.make[2])
    if a.load:
        return print(json.dumps(load(Path(a.load[0]), a.load[1])))
    data = os.environ.get("LLAMA_TEST_DATA")
    tokenizer = Path(data or "") / "tokenizer.model"
    if not tokenizer.is_file():
        raise SystemExit("needs LLAMA_TEST_DATA with the 32000-piece Llama 2 tokenizer.model")
    work = Path(a.workdir or tempfile.mkdtemp(prefix="load-memory-"))
    lines = [f"command: `python benchmarks/load_memory.py {' '.join(sys.argv[1:])}`", "",
             "| shape | checkpoint | int8 model + KV cache MB | peak owned (RssAnon) above baseline MB | ratio | "
             "peak file-backed (RssFile) MB | peak RSS MB | ratio |", "|---|---|---|---|---|---|---|---|"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        for fmt in a.fmt.split(","):
            ckpt = work / f"{a.shape}-{fmt}"
            subprocess.run([sys.executable, __file__, "--make", str(ckpt), a.shape, fmt], check=True, env=env)
            out = subprocess.run([sys.executable, __file__, "--load", str(ckpt), str(tokenizer)], check=True,
                                 env=env, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            mb = 1e6
            size = r["int8_model"] + r["kv_cache"]
            lines.append(f"| {a.shape} | {fmt} | {size / mb:.0f} | {r['anon'] / mb:.0f} | {r['anon'] / size:.2f} | "
                         f"{r['file'] / mb:.0f} | {r['rss'] / mb:.0f} | {r['rss'] / size:.2f} |")
            print(lines[-1], flush=True)
            shutil.rmtree(ckpt, ignore_errors=True)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "a") as f:
            f.write(f"\n## int8 load memory ({platform.node()})\n\n{text}\n")


if __name__ == "__main__":
    main()
