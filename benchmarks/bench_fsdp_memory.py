"""Memory per process of full fine-tuning with ``kollama.train --fsdp`` against the replicated data-parallel
trainer, same model, data and global batch, both on 2 processes (torchrun, gloo on CPU).

    python benchmarks/bench_fsdp_memory.py --tokenizer tokenizer.model [--shape 110M] [--steps 3]
        [--seq_len 256] [--nproc 2] [--results benchmarks/RESULTS.md]

The model is a random-weight Llama of the llama2.c stories110M shape (dim 768, 12 layers, 12 heads, FFN 2048,
vocabulary = the tokenizer's, 32000 for Llama 2's), written once as an fp32 Meta checkpoint. Each mode runs the real
trainer (``python -m kollama.train`` under torchrun, --method full, AdamW) in fresh processes; inside each, a thread
samples /proc/self/status every 10 ms. Reported per rank:

* RssAnon above the rank's baseline (the interpreter with torch and kollama imported and one tiny op run) after
  loading, and its peak while loading and training, and over the whole run (which adds the end's checkpoint and
  model/ writing): memory the process owns — weights, gradients, AdamW moments, activations, allocator slack.
  RssFile (the memory-mapped checkpoint, reclaimable page cache) is left out, as in convert_memory.py. The ranks
  run with MALLOC_MMAP_THRESHOLD_=131072 (see MALLOC_ENV);
* the bytes of that rank's trainer checkpoint files (weights + AdamW state it saved at the last step): the
  training state it holds, measured, not computed;
* tokens/s of rank 0 (metrics.jsonl, median over the steps after the first).

This process never imports torch. Without --tokenizer, $LLAMA_TEST_DATA/tokenizer.model is used.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_finetune_memory import SHAPES, load, machine
from bench_finetune_memory import _status_kb as status_kb

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20
# glibc serves allocations below its *dynamic* mmap threshold (it climbs to 32 MB after the first large free) from
# heaps it rarely gives back, so RssAnon keeps the high-water mark of freed buffers: FSDP gathers and frees one
# ~28 MB block after another and looked as large as the replicated run (1.08x) without this. A fixed threshold
# returns freed buffers to the OS, so RssAnon follows what is alive. Same setting for both modes.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
MODES = {"replicated": [], "fsdp": ["--fsdp", "True"]}


def make_checkpoint(path: Path, shape: str, tokenizer: str) -> None:
    """Random fp32 Meta checkpoint, one tensor generated at a time (child process, ``--make``)."""
    import sentencepiece as spm
    import torch

    from llama.checkpoint import write_checkpoint
    from llama.model import ModelArgs, Transformer

    params = {**SHAPES[shape], "vocab_size": spm.SentencePieceProcessor(model_file=tokenizer).vocab_size(),
              "norm_eps": 1e-5}
    shapes = {k: tuple(v.shape) for k, v in Transformer(ModelArgs(**params), device="meta").state_dict().items()}

    def tensors():
        for i, (name, s) in enumerate(shapes.items()):
            g = torch.Generator().manual_seed(i)
            yield name, torch.ones(s) if "norm" in name else torch.randn(s, generator=g) * 0.02

    write_checkpoint(path, params, [tensors()], fmt="pth")


def worker(out: Path, train_args: list) -> None:
    """One torchrun rank: baseline, then kollama.train with a sampler thread; writes mem.rankN.json."""
    import torch

    import kollama.train.recipe as R  # the whole trainer is imported before the baseline is taken
    from kollama.train.__main__ import run as train_cli

    torch.ones(8, 8) @ torch.ones(8, 8)  # torch's one-time runtime init belongs to the baseline
    rank = int(os.environ.get("RANK", "0"))
    baseline = status_kb("RssAnon")
    peak = {"anon": baseline}
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak["anon"] = max(peak["anon"], status_kb("RssAnon"))
            time.sleep(0.01)

    # Phases: the peak while loading and training is what --fsdp divides; saving the checkpoint and model/ at the
    # end adds serialisation buffers of its own, so it is reported apart. The trainer looks these names up in
    # its module at call time, so wrapping them there marks the phase boundaries.
    marks = {}

    def mark(name, fn):
        def wrapped(*args, **kwargs):
            if name == "save":
                marks.setdefault("train_peak", peak["anon"])
            result = fn(*args, **kwargs)
            if name == "load":
                marks["after_load"] = status_kb("RssAnon")
            return result
        return wrapped

    R.load_model = mark("load", R.load_model)
    R.save_trainer_state = mark("save", R.save_trainer_state)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    import fire

    fire.Fire(train_cli, command=train_args)
    done.set()
    thread.join()
    (out / f"mem.rank{rank}.json").write_text(json.dumps({
        "rank": rank, "after_load_above_mb": (marks["after_load"] - baseline) / 1024,
        "train_peak_above_mb": (marks["train_peak"] - baseline) / 1024,
        "peak_anon_above_mb": (peak["anon"] - baseline) / 1024}))


def state_bytes(step_dir: Path, rank: int, fsdp: bool) -> int:
    """Bytes of the weights + AdamW state this rank holds, from its own checkpoint files."""
    suffix = f"mp00.dp{rank:02d}" if fsdp else "mp00"
    return sum((step_dir / f"{kind}.{suffix}.{ext}").stat().st_size
               for kind, ext in (("weights", "safetensors"), ("optimizer", "pt")))


def run_mode(mode: str, work: Path, ckpt: Path, tokenizer: str, data: Path, a) -> dict:
    out = work / mode
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    train_args = ["--data", str(data), "--ckpt_dir", str(ckpt), "--tokenizer_path", tokenizer, "--out_dir",
                  str(out), "--method", "full", "--template", "text", "--packing", "True", "--block_size",
                  str(a.seq_len), "--micro_batch_size", "1", "--max_steps", str(a.steps), "--lr", "1e-4",
                  "--eval_every", "0", "--save_every", str(a.steps), "--progress", "False", *MODES[mode]]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.nproc),
           str(Path(__file__).resolve()), "--worker", str(out), "--", *train_args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'benchmarks'}", "OMP_NUM_THREADS": "1",
                                                       **MALLOC_ENV})
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    ranks = [json.loads((out / f"mem.rank{r}.json").read_text()) for r in range(a.nproc)]
    step_dir = out / "checkpoints" / f"step-{a.steps:06d}"
    for r in ranks:
        r["state_mb"] = state_bytes(step_dir, r["rank"], mode == "fsdp") / MB
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tps = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m][1:]
    shutil.rmtree(out / "checkpoints")
    return {"mode": mode, "ranks": ranks, "tokens_per_s": statistics.median(tps) if tps else float("nan"),
            "wall_s": time.perf_counter() - t0, "command": "torchrun --standalone --nproc_per_node "
            f"{a.nproc} -m kollama.train " + " ".join(train_args).replace(str(work), "$WORK")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--shape", default="110M", choices=sorted(SHAPES))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", "--results", dest="results", default=None, help="append a markdown section to this file")
    ap.add_argument("--make", nargs=2, default=None, help=argparse.SUPPRESS)  # internal: PATH TOKENIZER
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: the mode's out dir
    a, rest = ap.parse_known_args()
    if a.make:
        return make_checkpoint(Path(a.make[0]), a.shape, a.make[1])
    if a.worker:
        return worker(Path(a.worker), rest[1:] if rest[:1] == ["--"] else rest)
    fixtures = os.environ.get("LLAMA_TEST_DATA")
    tokenizer = a.tokenizer or (fixtures and f"{fixtures}/tokenizer.model")
    if not tokenizer or not Path(tokenizer).is_file():
        raise SystemExit("pass --tokenizer PATH (a SentencePiece model; Llama 2's gives the 32000-row vocabulary) "
                         "or set LLAMA_TEST_DATA to the fixtures folder")
    command = "python benchmarks/bench_fsdp_memory.py " + " ".join(sys.argv[1:])
    start_load = load()
    print(f"command: {command}\nmachine: {machine()}; load average before: {start_load}", flush=True)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_fsdp_"))
    try:
        ckpt = work / "base"
        if not ckpt.exists():
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--shape", a.shape, "--make", str(ckpt),
                            tokenizer], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        words = "the little girl saw a big red ball in the park and she wanted to play with it all day".split()
        data = work / "data.txt"  # enough packed blocks for steps x nproc rows
        data.write_text("".join(" ".join(words[(i + j) % len(words)] for j in range(60)) + "\n"
                                for i in range(40 * a.steps * a.nproc)))
        rows = [run_mode(m, work, ckpt, tokenizer, data, a) for m in MODES]
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    end_load = load()
    torch_version = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                                   capture_output=True, text=True).stdout.strip()
    lines = ["| mode | rank | weights + AdamW state held MB | RssAnon after load MB | peak RssAnon, load + "
             "training MB | peak RssAnon, whole run (with saving) MB | tokens/s (rank 0) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        for k in r["ranks"]:
            lines.append(f"| {r['mode']} | {k['rank']} | {k['state_mb']:.0f} | {k['after_load_above_mb']:.0f} | "
                         f"{k['train_peak_above_mb']:.0f} | {k['peak_anon_above_mb']:.0f} | "
                         f"{r['tokens_per_s']:.0f} |")
    rep, fs = rows

    def ratio(key, agg=max):
        return agg(k[key] for k in fs["ranks"]) / agg(k[key] for k in rep["ranks"])

    summary = (f"fsdp / replicated (worst rank): training state held {ratio('state_mb'):.3f}x, owned memory after "
               f"load {ratio('after_load_above_mb'):.3f}x, peak owned memory while training "
               f"{ratio('train_peak_above_mb'):.3f}x, over the whole run {ratio('peak_anon_above_mb'):.3f}x; "
               f"tokens/s {fs['tokens_per_s'] / rep['tokens_per_s']:.2f}x")
    print("\n".join(lines) + "\n" + summary + f"\nload average after: {end_load}")
    if a.results:
        section = [
            f"\n## FSDP full fine-tuning memory per process ({datetime.date.today().isoformat()})\n",
            f"Machine: {machine()}, torch {torch_version}; {a.nproc} processes x 1 thread; load average before "
            f"{start_load} -> after {end_load}.\n",
            f"Command: `{command}`. Model: random fp32 {a.shape} shape, --method full, AdamW, {a.steps} steps of "
            f"{a.nproc} x 1 packed block of {a.seq_len} tokens. Trainer commands (one per mode):\n",
            *[f"    {r['command']}" for r in rows], "",
            *lines, "", summary + ".\n",
        ]
        with open(a.results, "a") as f:
            f.write("\n".join(section))
        print(f"appended to {a.results}")


if __name__ == "__main__":
    main()
