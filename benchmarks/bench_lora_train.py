"""LoRA training speed and peak memory: kollama.adapters.lora on llama.model against transformers + peft, same
model.

    python benchmarks/bench_lora_train.py [--shapes stories15M,110M] [--batch 4] [--seq 256] [--warmup 1]
        [--steps stories15M:8,110M:3] [--mem_steps 2] [--threads 2] [--results benchmarks/RESULTS.md] [--profile]

Same random fp32 weights (written once per shape: Meta names for ours, the HF layout with the q/k rotary
permutation of tests/helpers.py for transformers), same LoRA config (wq,wk,wv,wo <-> q_proj,k_proj,v_proj,o_proj;
r 8, alpha 16, dropout 0.05), same random token batches, AdamW (lr 1e-4, weight decay 0, foreach=False as the
trainer's CPU setting), gradient clipping at 1.0, fp32 on CPU. transformers runs with attn_implementation="sdpa".

Ours is a minimal loop equivalent to kollama.train's step (``TrainRecipe.forward_backward`` + the AdamW step,
without the run's data plan and logging): ``token_loss(model(tokens, 0, use_cache=False), labels, n_targets)``, backward,
``kollama.train.clip_grad_norm``, optimizer step, ``zero_grad(set_to_none=True)``. transformers + peft is the
loop a HF Trainer runs: ``model(input_ids, labels=..., use_cache=False).loss``, backward,
``clip_grad_norm_``, step, zero_grad. Both first-step losses are printed: equal losses show identical models.

Speed: one subprocess per shape holds both models and alternates their steps (ours, peft, peft, ours, ...), so
load from other jobs on a shared machine hits both alike; tok/s = batch x seq / median step time. Memory: a fresh
subprocess per (framework, shape); peak = ru_maxrss at the end minus ru_maxrss after imports (weights, LoRA,
optimizer state, activations, gradients). ``--profile`` prints a torch.profiler table of one step of each.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "stories15M": dict(dim=288, n_layers=6, n_heads=6, vocab_size=32000, multiple_of=32),  # FFN 768
    "110M": dict(dim=768, n_layers=12, n_heads=12, vocab_size=32000, multiple_of=256),  # FFN 2048
}
TARGETS = {"stories15M": 1.5, "110M": 1.1}
LORA = dict(r=8, alpha=16, dropout=0.05)
LR = 1e-4


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------------------------------------------------
# weights (parent process)
# ---------------------------------------------------------------------------------------------------------------
def write_weights(shape: str, seq: int, out: Path) -> None:
    """Random fp32 weights in both layouts: out/meta.safetensors + params.json, out/hf (from_pretrained folder)."""
    import torch
    from safetensors.torch import save_file
    from tests.helpers import hf_state_dict
    from llama.model import ModelArgs, Transformer

    args = ModelArgs(**SHAPES[shape], max_seq_len=seq, max_batch_size=1)
    model = Transformer(args)  # llama.parallel init: normal(0, 0.02)-like weights, norms at 1
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "meta.safetensors"))
    (out / "params.json").write_text(json.dumps({**SHAPES[shape], "max_seq_len": seq}))
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.kv_heads,
        rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta, max_position_embeddings=seq * 2,
        tie_word_embeddings=False, torch_dtype="float32")
    (out / "hf").mkdir(exist_ok=True)
    config.save_pretrained(out / "hf")
    hf = {k: v.contiguous() for k, v in hf_state_dict(state, args).items()}
    save_file(hf, str(out / "hf" / "model.safetensors"), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------------------------
# worker (one framework, one shape, fresh process)
# ---------------------------------------------------------------------------------------------------------------
def build(fw: str, wdir: Path, a):
    """(step function: tokens -> loss, trainable parameter count) for one framework, model loaded from wdir."""
    import torch

    p = json.loads((wdir / "params.json").read_text())
    torch.manual_seed(0)
    if fw == "ours":
        from safetensors.torch import load_file
        from kollama.adapters import lora as L
        from kollama.train import clip_grad_norm, token_loss
        from llama.model import ModelArgs, Transformer

        # As kollama.train.loading.load_model: meta-device model, tensors assigned, buffers allocated.
        model = Transformer(ModelArgs(**p, max_batch_size=1), device="meta", dtype=torch.float32)
        model.load_state_dict(load_file(str(wdir / "meta.safetensors")), strict=True, assign=True)
        model.init_buffers(torch.device("cpu"), torch.float32)
        model.requires_grad_(False)
        model = L.apply_lora(model, targets=("wq", "wk", "wv", "wo"), **LORA)
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaForCausalLM

        hf = LlamaForCausalLM.from_pretrained(wdir / "hf", attn_implementation="sdpa", dtype=torch.float32)
        cfg = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
        model = get_peft_model(hf, cfg)
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    decay, no_decay = [q for q in params if q.ndim >= 2], [q for q in params if q.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.0}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, foreach=False, fused=False)

    def step(tokens: torch.Tensor) -> float:
        if fw == "ours":  # the body of kollama.train's loop for one micro-batch, no packing mask
            n_targets = tokens.shape[0] * (tokens.shape[1] - 1)
            logits = model(tokens, 0, use_cache=False)
            if a.loss == "trainer":
                loss = token_loss(logits, tokens, n_targets)
            else:  # diagnostic: shift the labels instead of slicing (copying) the logits, as transformers does
                labels = torch.nn.functional.pad(tokens[:, 1:], (0, 1), value=-100)
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                         reduction="sum") / n_targets
            del logits
            loss.backward()
            clip_grad_norm(params, [False] * len(params), 1.0)
        else:  # what a HF Trainer step does
            loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step, sum(q.numel() for q in params)


def worker(a) -> None:
    """--worker ours|peft: one framework in a fresh process, for its peak memory (and its own tok/s).
    --worker both: both models in one process, steps alternating ours, peft, peft, ours, ... for the speed ratio:
    whatever load other jobs put on the machine hits both nearly equally."""
    import torch

    torch.set_num_threads(a.threads)
    fws = ("ours", "peft") if a.worker == "both" else (a.worker,)
    if "ours" in fws:
        import kollama.adapters.lora, kollama.train, llama.model, safetensors.torch  # noqa: E401,F401
    if "peft" in fws:
        import peft, transformers  # noqa: E401,F401
    # torch's first op pays a one-time ~66 MB runtime initialisation; importing transformers already ran ops and
    # paid it, importing llama/kollama does not. Pay it here in both, so the baseline really is "after imports".
    x = torch.randn(64, 64)
    (x @ x).sum().item()
    torch.empty(8, device="meta").normal_()
    base_mb = _rss_mb()

    wdir = Path(a.weights)
    vocab = json.loads((wdir / "params.json").read_text())["vocab_size"]
    steps = {}
    trainable = {}
    for fw in fws:
        steps[fw], trainable[fw] = build(fw, wdir, a)
    g = torch.Generator().manual_seed(1234)
    # A profiled step (after warmup) is an extra one: it is not timed.
    batches = [torch.randint(3, vocab, (a.batch, a.seq), generator=g)
               for _ in range(a.warmup + a.steps + bool(a.profile))]
    torch.manual_seed(1)  # dropout masks
    losses = {fw: [] for fw in fws}
    times = {fw: [] for fw in fws}
    for i, tokens in enumerate(batches):
        order = fws if i % 2 == 0 else fws[::-1]
        for fw in order:
            if a.profile and i == a.warmup:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    losses[fw].append(steps[fw](tokens))
                print(f"PROFILE {fw}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25),
                      file=sys.stderr)
                continue
            t0 = time.perf_counter()
            losses[fw].append(steps[fw](tokens))
            times[fw].append(time.perf_counter() - t0)
    out = {"peak_mb": _rss_mb() - base_mb, "baseline_mb": base_mb}
    for fw in fws:
        measured = times[fw][a.warmup:]
        out[fw] = {"tok_s": len(measured) * a.batch * a.seq / sum(measured) if measured else None,
                   "step_s": measured, "losses": losses[fw], "trainable": trainable[fw]}
    print("RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------------
def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, as `uptime` prints them."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    mem = next(l.split()[1] for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
    versions = subprocess.run(
        [sys.executable, "-c", "import torch, transformers, peft; print(f'torch {torch.__version__}, transformers "
         "{transformers.__version__}, peft {peft.__version__}')"], capture_output=True, text=True).stdout.strip()
    return (f"{cpu}, {os.cpu_count()} cores, {int(mem) / 2**20:.0f} GiB RAM, Linux {platform.release()}, "
            f"Python {platform.python_version()}, {versions}")


def run_worker(fw: str, wdir: Path, a, warmup: int, steps: int, profile: bool = False) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", fw, "--weights", str(wdir),
           "--batch", str(a.batch), "--seq", str(a.seq), "--warmup", str(warmup), "--steps", str(steps),
           "--threads", str(a.threads)] + (["--profile"] if profile else [])
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    line = next((l for l in r.stdout.splitlines() if l.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        raise RuntimeError(f"{fw} worker failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    res = json.loads(line[len("RESULT "):])
    if profile:
        res["profile"] = r.stderr[r.stderr.find("PROFILE"):]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="stories15M,110M")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", default="stories15M:8,110M:3",
                    help="measured steps per framework in the speed run: one number for every shape, or shape:n")
    ap.add_argument("--mem_steps", type=int, default=2, help="measured steps (after warmup) in each memory run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", "--results", dest="results", default=None, help="append a section to this markdown file")
    ap.add_argument("--profile", action="store_true", help="also profile one step of each framework per shape")
    ap.add_argument("--worker", choices=["ours", "peft", "both"], help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    ap.add_argument("--write_weights", help=argparse.SUPPRESS)
    ap.add_argument("--loss", choices=["trainer", "shift"], default="trainer", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        a.steps = int(a.steps)
        worker(a)
        return
    if a.write_weights:
        write_weights(a.write_weights, a.seq, Path(a.weights))
        return
    # The driver imports nothing heavy and builds nothing itself: a child inherits its parent's ru_maxrss
    # (Linux keeps it across fork and execve), so a fat driver would raise every worker's "after imports" baseline.
    steps = {s: int(a.steps) for s in SHAPES} if a.steps.isdigit() else \
        {k: int(v) for k, v in (kv.split(":") for kv in a.steps.split(","))}

    command = "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(__file__, ROOT)] + sys.argv[1:])
    load_start = loadavg()
    info = machine()
    print(f"$ {command}\n{info}\nload average at start: {load_start}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in a.shapes.split(","):
            wdir = Path(tmp) / shape
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--write_weights", shape, "--weights",
                            str(wdir), "--seq", str(a.seq)], check=True, cwd=ROOT)
            mem = {}
            for fw in ("ours", "peft"):
                r = run_worker(fw, wdir, a, a.warmup, a.mem_steps)
                mem[fw] = r["peak_mb"]
                print(f"{shape} memory run {fw:4s}: peak {r['peak_mb']:.0f} MB above {r['baseline_mb']:.0f} MB after "
                      f"imports; alone {r[fw]['tok_s']:.0f} tok/s; load {loadavg()}", flush=True)
            r = run_worker("both", wdir, a, a.warmup, steps[shape], profile=a.profile)
            if a.profile:
                print(r["profile"], flush=True)
            t = {fw: r[fw]["step_s"] for fw in ("ours", "peft")}
            tok = {fw: a.batch * a.seq / statistics.median(t[fw]) for fw in t}
            pair_ratios = [p / o for o, p in zip(t["ours"], t["peft"])]
            ratio = tok["ours"] / tok["peft"]
            loss_diff = abs(r["ours"]["losses"][0] - r["peft"]["losses"][0])
            met = ratio >= TARGETS[shape] and mem["ours"] <= mem["peft"]
            print(f"{shape} speed run (alternating steps): ours {[round(x, 2) for x in t['ours']]} s, peft "
                  f"{[round(x, 2) for x in t['peft']]} s; first-step losses {r['ours']['losses'][0]:.6f} / "
                  f"{r['peft']['losses'][0]:.6f}; load {loadavg()}", flush=True)
            rows.append((shape, tok["ours"], tok["peft"], ratio, mem["ours"], mem["peft"], TARGETS[shape], met,
                         loss_diff, statistics.median(pair_ratios), r["ours"]["trainable"], r["peft"]["trainable"]))
    load_end = loadavg()

    head = ("| shape | ours tok/s | peft tok/s | ratio | ours peak MB | peft peak MB | target | target met? |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [f"| {s} | {o:.0f} | {p:.0f} | {r:.2f}x | {om:.0f} | {pm:.0f} | >= {t}x, mem <= peft | "
             f"{'yes' if m else 'NO'} |" for s, o, p, r, om, pm, t, m, *_ in rows]
    table = "\n".join([head] + lines)
    detail = "\n".join(f"- {s}: median of the per-step-pair ratios {pr:.2f}x; trainable parameters {to:,} (ours) / "
                       f"{tp:,} (peft); |first-step loss difference| {ld:.1e} (identical models)"
                       for s, *_, ld, pr, to, tp in rows)
    print(f"\n{table}\n{detail}\nload average at end: {load_end}")
    if a.results:
        section = f"""
## LoRA training speed and memory vs transformers + peft ({time.strftime('%Y-%m-%d')})

Machine: {info}; `torch.set_num_threads({a.threads})`; load average (1/5/15 min) {load_start} at the start and {load_end} at the end (the 2 cores are shared with other engineers' jobs, so the speed run holds both models in one process and alternates their steps, ours, peft, peft, ours, ...: both see the same load; tok/s = batch x seq / median step time).

Setup: random fp32 weights, identical in both (HF copy made with the q/k rotary permutation); LoRA on wq,wk,wv,wo <-> q_proj,k_proj,v_proj,o_proj, r {LORA['r']}, alpha {LORA['alpha']}, dropout {LORA['dropout']}; AdamW lr {LR} (foreach=False, as the trainer on CPU), grad clip 1.0; batch {a.batch} x {a.seq} random token ids; {a.warmup} warmup + {steps} measured steps per framework in the speed run. transformers uses `attn_implementation="sdpa"`. Ours: a loop equivalent to kollama.train's step (token_loss, backward, clip_grad_norm, AdamW); peft: `model(input_ids, labels=..., use_cache=False).loss`, backward, clip_grad_norm_, AdamW. Peak MB = ru_maxrss minus ru_maxrss after imports and one tiny torch op (torch's one-time ~66 MB runtime init, which importing transformers already pays; baselines ~290 MB ours, ~410 MB transformers + peft), in a fresh process per (framework, shape) running {a.warmup} + {a.mem_steps} steps.

Command: `{command}`

{table}

{detail}
"""
        with open(ROOT / a.results if not os.path.isabs(a.results) else a.results, "a") as f:
            f.write(section)
        print(f"appended to {a.results}")


if __name__ == "__main__":
    main()
