"""Peak memory of ``python -m llama.convert meta_to_hf`` / ``hf_to_meta`` on a ~1 GB fp32 model, against the
model's largest tensor, its largest output shard and its total size.

    python benchmarks/convert_memory.py [--workdir DIR] [--out benchmarks/RESULTS.md] [--keep]

The model: dim 1024, 16 layers, 16 heads, vocabulary 32000, FFN 2816 -> 271M parameters, 1.08 GB in fp32; its largest
tensors are the embedding and the classifier (32000 x 1024, 131 MB). It is written as a 2-shard Meta .pth checkpoint
(Meta's own download format), then each conversion runs in its own process while this one polls
/proc/PID/status (VmRSS, RssAnon, RssFile) every 10 ms and reads the child's ru_maxrss from wait4.
RssAnon is memory the process owns; RssFile is clean file pages mapped from the checkpoint (page cache the kernel
can drop), which ru_maxrss and VmRSS include. The baseline is the same interpreter importing llama.convert.
This process never imports torch (Linux carries a parent's RSS at fork into the child's ru_maxrss), so the model
is written by a child too.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = dict(dim=1024, n_layers=16, n_heads=16, vocab_size=32000, multiple_of=256, norm_eps=1e-5)
MB = 10**6


def make_checkpoint(path: Path, mp: int = 2) -> None:
    """A random fp32 Meta checkpoint written one tensor at a time (each regenerated from its own seed per shard,
    so at most one shard is held). Runs in a child process (``--make``)."""
    import torch

    from llama.checkpoint import split_tensor, write_checkpoint
    from llama.model import ModelArgs, Transformer

    shapes = {k: tuple(v.shape) for k, v in Transformer(ModelArgs(**MODEL), device="meta").state_dict().items()}

    def tensor(i, name):
        g = torch.Generator().manual_seed(i)
        return torch.randn(shapes[name], generator=g) * (0.02 if "norm" not in name else 1.0)

    def shard(rank):
        for i, name in enumerate(shapes):
            yield name, split_tensor(name, tensor(i, name), mp)[rank]

    write_checkpoint(path, dict(MODEL), (shard(r) for r in range(mp)), fmt="pth")


def model_figures() -> dict:
    """Sizes from the model arguments alone (fp32)."""
    dim, layers, vocab = MODEL["dim"], MODEL["n_layers"], MODEL["vocab_size"]
    hidden = int(2 * 4 * dim / 3)
    hidden = MODEL["multiple_of"] * ((hidden + MODEL["multiple_of"] - 1) // MODEL["multiple_of"])
    sizes = [vocab * dim, dim, vocab * dim] + layers * ([dim * dim] * 4 + [hidden * dim] * 3 + [dim] * 2)
    return {"total": 4 * sum(sizes), "largest_tensor": 4 * max(sizes), "n_tensors": len(sizes), "params": sum(sizes),
            "hidden": hidden}


def status_kb(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
    return out


def measure(cmd: list) -> dict:
    """Run ``cmd``; peak VmRSS / RssAnon / RssFile (polled) and ru_maxrss (from wait4), in bytes, and seconds."""
    start = time.time()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def poll():
        while not done.is_set():
            try:
                for k, v in status_kb(proc.pid).items():
                    peaks[k] = max(peaks[k], v)
            except (OSError, ValueError):
                pass
            time.sleep(0.01)

    thread = threading.Thread(target=poll)
    thread.start()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
    done.set()
    thread.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        log.seek(0)
        sys.exit(f"{' '.join(cmd)} failed:\n{log.read().decode()[-3000:]}")
    return {**{k: v * 1024 for k, v in peaks.items()}, "maxrss": usage.ru_maxrss * 1024,
            "seconds": time.time() - start}


def largest_file(folder: Path, pattern: str) -> int:
    return max(p.stat().st_size for p in folder.glob(pattern))


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    from importlib.metadata import version

    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {version('torch')}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=None, help="where the ~3.3 GB of checkpoints go (default: a temp folder)")
    ap.add_argument("--out", "--results", dest="results", default=None,
                    help="append the figures as Markdown to this file (nothing is written without it)")
    ap.add_argument("--max_shard_size", default="200MB")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--make", default=None, help=argparse.SUPPRESS)  # internal: write the model there and exit
    opts = ap.parse_args()
    if opts.make:
        sys.path.insert(0, str(ROOT))
        make_checkpoint(Path(opts.make))
        return

    work = Path(opts.workdir or tempfile.mkdtemp(prefix="convert_memory-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        meta = work / "meta"
        print(f"writing a random fp32 checkpoint to {meta} ...", flush=True)
        subprocess.run([sys.executable, __file__, "--make", str(meta)], check=True)
        figures = model_figures()
        py = [sys.executable]
        runs = [
            ("baseline (import llama.convert)", py + ["-c", "import llama.convert, llama.hf"], None),
            (f"meta_to_hf --max_shard_size {opts.max_shard_size}",
             py + ["-m", "llama.convert", "meta_to_hf", str(meta), str(work / "hf"),
                   "--max_shard_size", opts.max_shard_size], (work / "hf", "*.safetensors")),
            ("hf_to_meta --mp 4",
             py + ["-m", "llama.convert", "hf_to_meta", str(work / "hf"), str(work / "mp4"), "--mp", "4"],
             (work / "mp4", "consolidated.*")),
            ("hf_to_meta --mp 1 --fmt pth",
             py + ["-m", "llama.convert", "hf_to_meta", str(work / "hf"), str(work / "mp1"), "--fmt", "pth"],
             (work / "mp1", "consolidated.*")),
        ]
        rows = []
        for label, cmd, out in runs:
            print(f"$ {' '.join(cmd)}", flush=True)
            m = measure(cmd)
            m["shard"] = largest_file(*out) if out else None
            rows.append((label, cmd, m))
            print(f"  peak ru_maxrss {m['maxrss'] / MB:.0f} MB, RssAnon {m['RssAnon'] / MB:.0f} MB, "
                  f"RssFile {m['RssFile'] / MB:.0f} MB, {m['seconds']:.1f} s", flush=True)
    finally:
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)

    base = rows[0][2]
    lines = [
        f"## Conversion peak memory ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the end (other jobs skew the times, "
        f"not the memory).",
        "",
        f"Model: random fp32 Llama, dim {MODEL['dim']}, {MODEL['n_layers']} layers, {MODEL['n_heads']} heads, "
        f"vocabulary {MODEL['vocab_size']}, FFN {figures['hidden']}: {figures['params'] / 1e6:.0f}M parameters in "
        f"{figures['n_tensors']} tensors, **total {figures['total'] / MB:.0f} MB**, **largest tensor {figures['largest_tensor'] / MB:.0f} "
        f"MB** (embedding / classifier). Source: Meta layout, 2 × consolidated.NN.pth.",
        "",
        "Command: `python benchmarks/convert_memory.py`. Peaks in MB; \"above baseline\" subtracts the interpreter "
        f"with torch and llama imported (ru_maxrss {base['maxrss'] / MB:.0f} MB, RssAnon {base['RssAnon'] / MB:.0f} "
        "MB). RssFile = clean checkpoint pages mapped read-only (page cache, reclaimable); RssAnon = owned memory.",
        "",
        "| conversion | largest output shard | peak ru_maxrss | above baseline | peak RssAnon | above baseline "
        "| peak RssFile | time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, _, m in rows[1:]:
        lines.append(
            f"| `{label}` | {m['shard'] / MB:.0f} | {m['maxrss'] / MB:.0f} | {(m['maxrss'] - base['maxrss']) / MB:.0f} "
            f"| {m['RssAnon'] / MB:.0f} | {(m['RssAnon'] - base['RssAnon']) / MB:.0f} | {m['RssFile'] / MB:.0f} "
            f"| {m['seconds']:.1f} s |"
        )
    lines += ["", "Exact commands:", "", "```"] + [" ".join(c).replace(str(work), "$WORK") for _, c, _ in rows[1:]]
    lines += ["```", ""]
    section = "\n".join(lines)
    print()
    print(section)
    if opts.results:
        results = Path(opts.results)
        if not results.exists():
            results.write_text("# Benchmark results\n\nAppended by the scripts in `benchmarks/`; newest last.\n\n")
        with open(results, "a") as f:
            f.write(section + "\n")
        print(f"appended to {results}")


if __name__ == "__main__":
    main()
