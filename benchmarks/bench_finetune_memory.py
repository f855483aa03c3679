"""Peak memory and tokens/s of full fine-tuning vs LoRA vs QLoRA (NF4 base) on the same model and data.

    python benchmarks/bench_finetune_memory.py [--shapes 15M,110M] [--steps 3] [--batch 4] [--seq_len 128]
        [--device cpu|cuda] [--threads N] [--results benchmarks/RESULTS.md]

Models: random-weight Llamas with the llama2.c shapes stories15M (dim 288, 6 layers, 6 heads, FFN 768, vocab
32000) and stories110M (dim 768, 12 layers, 12 heads, FFN 2048, vocab 32000); ``7B`` (dim 4096, 32 layers,
FFN 11008) only makes sense with --device cuda. Every (shape, method) runs in a fresh child process, so each
peak belongs to one method. The model is materialized one block at a time (and, for QLoRA, quantized before
the next block exists), so the peak is the training state, not a transient dense copy. This process never imports
torch (Linux carries a parent's RSS at fork into the child's ru_maxrss).

Methods, all with AdamW (fp32 states) and the same random token batches:
* full: every parameter trainable, fp32;
* lora: frozen base (fp32 on CPU, bf16 on CUDA), LoRA r=8, alpha=16 on wq wk wv wo w1 w2 w3;
* qlora: the same with those seven linears stored as NF4 (kollama.adapters.qlora.quantize_base_nf4); embedding,
  norms and output dense.

Reported per run: peak RSS above the child's baseline (interpreter + torch + llama/kollama imported, plus one
forward/backward/AdamW step of a tiny model for lazy initialization; VmHWM is then reset via /proc/self/clear_refs),
RSS after the model is built, tokens/s over the timed steps (after one warm-up step), and the analytic bytes of
weights, gradients and optimizer states (kollama.adapters.qlora.memory_accounting). On CUDA the peak is
torch.cuda.max_memory_allocated instead. On a shared CPU use --threads 1: spinning OpenMP threads on busy cores
make tokens/s swing by 10x.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "15M": dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=32000, multiple_of=32),  # FFN 768
    "110M": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, vocab_size=32000, multiple_of=32),  # FFN 2048
    "7B": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000, multiple_of=256),  # FFN 11008
}
METHODS = ("full", "lora", "qlora")
LORA = dict(targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"), r=8, alpha=16, dropout=0.0)
MB = 2**20
# torchtune's published Llama-2-7B peaks (README "memory and training speed" table, single GPU, bf16).
TORCHTUNE_7B = {"qlora": 8.57, "lora": 17.18}


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def child(method: str, shape: str, steps: int, batch: int, seq_len: int, device: str, threads: int,
          checkpointing: bool) -> dict:
    import torch
    import torch.nn.functional as F

    from kollama.adapters.lora import apply_lora, trainable_parameters
    from kollama.adapters.qlora import memory_accounting, quantize_base_nf4
    from llama.model import ModelArgs, Transformer

    torch.set_num_threads(threads)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    base_dtype = torch.bfloat16 if cuda and method != "full" else torch.float32
    # Warm up on a tiny model first: lazily loaded kernels, OpenMP thread pools and allocator arenas belong to the
    # baseline, not to the method measured next.
    tiny = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=2, vocab_size=64, max_seq_len=8, max_batch_size=1))
    tiny.to(dev)
    if method == "qlora":
        quantize_base_nf4(tiny, measure_error=False)
    F.cross_entropy(tiny(torch.zeros(1, 8, dtype=torch.long, device=dev), 0, use_cache=False).flatten(0, 1),
                    torch.zeros(8, dtype=torch.long, device=dev)).backward()
    torch.optim.AdamW([p for p in tiny.parameters() if p.grad is not None]).step()
    del tiny
    try:  # the peak from here on is this method's (imports and warm-up are the baseline)
        Path("/proc/self/clear_refs").write_text("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    baseline_kb = _status_kb("VmRSS")
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)

    args = ModelArgs(**SHAPES[shape], max_seq_len=seq_len, max_batch_size=1)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    model = Transformer(args, device="meta")

    def materialize(module):
        for sub in module.modules():
            for name, p in list(sub.named_parameters(recurse=False)):
                if "norm" in type(sub).__name__.lower():
                    value = torch.ones(p.shape)
                else:
                    value = torch.randn(p.shape, generator=g) * 0.02
                sub._parameters[name] = torch.nn.Parameter(value.to(dev, base_dtype), requires_grad=False)

    for name, sub in model.named_children():
        if name == "layers":
            for layer in sub:
                materialize(layer)
                if method == "qlora":  # quantize before the next block exists: no dense copy of the model
                    quantize_base_nf4(layer, measure_error=False)
        else:
            materialize(sub)
    model.init_buffers(dev, base_dtype)
    if method == "full":
        model.requires_grad_(True)
    else:
        torch.manual_seed(0)
        apply_lora(model, **LORA)
    build_s = time.perf_counter() - t0
    if checkpointing:
        from torch.utils.checkpoint import checkpoint

        for layer in model.layers:
            layer.forward = (lambda f: lambda *a, **k: checkpoint(f, *a, use_reentrant=False, **k))(layer.forward)
    after_build_kb = _status_kb("VmRSS")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=cuda, fused=False)
    tokens = torch.randint(0, args.vocab_size, (steps + 1, batch, seq_len + 1), generator=g).to(dev)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    model.train()
    losses, t_start = [], None
    for step in range(steps + 1):
        if step == 1:  # step 0 is the warm-up (allocations, optimizer state)
            if cuda:
                torch.cuda.synchronize(dev)
            t_start = time.perf_counter()
        x = tokens[step]
        with autocast:
            logits = model(x[:, :-1], 0, use_cache=False)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if cuda:
        torch.cuda.synchronize(dev)
    elapsed = time.perf_counter() - t_start
    result = dict(method=method, shape=shape, device=device, threads=threads, steps=steps, batch=batch,
                  seq_len=seq_len, checkpointing=checkpointing, tokens_per_s=steps * batch * seq_len / elapsed,
                  step_s=elapsed / steps, build_s=build_s, losses=losses, hwm_reset=hwm_reset,
                  n_params=trainable_parameters(model)["total"],  # NF4 weights count as parameters
                  n_trainable=sum(p.numel() for p in params))
    peak_kb = _status_kb("VmHWM")
    result.update(baseline_mb=baseline_kb / 1024, after_build_above_mb=(after_build_kb - baseline_kb) / 1024,
                  peak_rss_above_mb=(peak_kb - baseline_kb) / 1024)
    if cuda:
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated(dev) / MB
    acct = memory_accounting(model, optimizer)
    result["accounting_mb"] = {k: v / MB for k, v in acct.items()}
    if method == "qlora":
        from kollama.adapters.nf4 import bits_per_parameter

        result["bits_per_parameter"] = bits_per_parameter(model)
    return result


def analytic_7b() -> dict:
    """Weights + gradients + AdamW states of Llama-2-7B (GB), from the shapes alone (no activations)."""
    dim, layers, vocab, ffn = 4096, 32, 32000, 11008
    block = layers * (4 * dim * dim + 3 * dim * ffn)
    dense_rest = 2 * vocab * dim + (2 * layers + 1) * dim
    lora = layers * LORA["r"] * (4 * 2 * dim + 3 * (dim + ffn))
    nf4_bits = 4 + 8 / 64 + 32 / (64 * 256)  # per parameter, large layers (kollama.adapters.nf4 storage)
    gb = 1e9
    return {
        "lora_bf16": (2 * (block + dense_rest) + 16 * lora) / gb,
        "qlora_nf4": (block * nf4_bits / 8 + 2 * dense_rest + 16 * lora) / gb,
        "full_fp32_adamw": 16 * (block + dense_rest) / gb,
        "lora_params": lora,
    }


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines()
                          if ln.startswith("MemTotal")).split()[1])
    except (OSError, StopIteration, ValueError):
        mem_kb = 0
    return (f"{cpu}, {os.cpu_count()} cores, {mem_kb / 2**20:.0f} GiB RAM, Linux {platform.release()}, "
            f"Python {platform.python_version()}")


def load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="15M,110M")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--activation_checkpointing", action="store_true")
    ap.add_argument("--out", "--results", dest="results", default=None, help="append a markdown section to this file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # "method:shape", internal
    a = ap.parse_args()
    if a.child:
        method, shape = a.child.split(":")
        print(json.dumps(child(method, shape, a.steps, a.batch, a.seq_len, a.device, a.threads,
                               a.activation_checkpointing)))
        return
    for s in a.shapes.split(","):
        if s not in SHAPES:
            raise SystemExit(f"unknown shape {s!r}; choose from {sorted(SHAPES)}")
    command = "python benchmarks/bench_finetune_memory.py " + " ".join(sys.argv[1:])
    start_load = load()
    print(f"command: {command}\nmachine: {machine()}; load average before: {start_load}", flush=True)
    torch_version = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                                   capture_output=True, text=True).stdout.strip()
    rows = []
    for shape in a.shapes.split(","):
        for method in a.methods.split(","):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", f"{method}:{shape}", "--steps",
                   str(a.steps), "--batch", str(a.batch), "--seq_len", str(a.seq_len), "--device", a.device,
                   "--threads", str(a.threads)] + (["--activation_checkpointing"] if a.activation_checkpointing else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            if proc.returncode != 0:
                raise SystemExit(f"{method} {shape} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(json.dumps(r), flush=True)
    end_load = load()
    lines = table(rows, a.device)
    est = analytic_7b()
    text = "\n".join(lines)
    print(text)
    print(f"load average after: {end_load}")
    if a.results:
        today = datetime.date.today().isoformat()
        section = [
            f"\n## Fine-tuning memory: full vs LoRA vs QLoRA ({today})\n",
            f"Machine: {machine()}, torch {torch_version}; torch threads per run: {a.threads}; load average before {start_load} "
            f"-> after {end_load} (1/5/15 min; other jobs share the 2 cores, so tokens/s are only comparable "
            f"within this table).\n",
            f"Command: `{command}`. Random weights, {a.steps} timed steps after 1 warm-up, batch {a.batch} x "
            f"{a.seq_len} tokens, AdamW; LoRA/QLoRA r=8 alpha=16 on wq wk wv wo w1 w2 w3; each run in a fresh "
            f"process. Peak = VmHWM above the child's baseline (interpreter + torch + llama/kollama imports + a "
            f"tiny warm-up step), "
            f"which includes activations and allocator slack; the last columns count tensors only "
            f"(kollama.adapters.qlora.memory_accounting: weights, fp32 gradients, AdamW states).\n",
            *lines,
            "",
            f"GPU (Llama-2-7B, bf16): not measured here (no GPU for this task; the script supports `--device cuda "
            f"--shapes 7B`, peak = torch.cuda.max_memory_allocated). torchtune publishes peaks of "
            f"{TORCHTUNE_7B['qlora']} GB (QLoRA) and {TORCHTUNE_7B['lora']} GB (LoRA) for Llama-2-7B. Our analytic "
            f"weights + adapter gradients + AdamW for 7B (r=8 on all seven block linears, "
            f"{est['lora_params'] / 1e6:.1f}M adapter params, no activations): LoRA bf16 base "
            f"{est['lora_bf16']:.2f} GB, QLoRA NF4 base {est['qlora_nf4']:.2f} GB, full fp32 AdamW "
            f"{est['full_fp32_adamw']:.1f} GB.\n",
        ]
        with open(a.results, "a") as f:
            f.write("\n".join(section))
        print(f"appended to {a.results}")


def table(rows, device: str) -> list:
    peak_col = "CUDA peak MB" if device.startswith("cuda") else "peak RSS above baseline MB"
    out = [f"| model | method | params | trainable | bits/base param | {peak_col} | RSS after build MB | "
           f"tokens/s | weights MB | grads MB | AdamW MB | tensors total MB |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = r["accounting_mb"]
        weights = acc["frozen_dense"] + acc["nf4"] + acc["trainable"]
        peak = r["cuda_peak_mb"] if "cuda_peak_mb" in r else r["peak_rss_above_mb"]
        bits = f"{r['bits_per_parameter']:.4f}" if "bits_per_parameter" in r else ("32" if r["device"] == "cpu"
                                                                                    or r["method"] == "full" else "16")
        out.append(f"| {r['shape']} | {r['method']} | {r['n_params'] / 1e6:.1f}M | {r['n_trainable'] / 1e6:.2f}M | "
                   f"{bits} | {peak:.0f} | {r['after_build_above_mb']:.0f} | {r['tokens_per_s']:.0f} | "
                   f"{weights:.0f} | {acc['gradients']:.0f} | {acc['optimizer']:.0f} | "
                   f"{weights + acc['gradients'] + acc['optimizer']:.0f} |")
    return out


if __name__ == "__main__":
    main()
