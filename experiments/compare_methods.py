"""Which Korean adaptation method works best at equal budget? A small-scale version, runnable on a CPU.

    python experiments/compare_methods.py [--data FIXTURES] [--out experiments/compare_runs] [--quick]
        [--md experiments/compare_methods.md]

Base: stories260K (llama2.c TinyStories, 260K parameters, English only, tokenizer tok512), converted once with
``python -m llama.convert llama2c``. Arms = method x curriculum, every arm trained with ``python -m kollama.train``:

  methods     lora    LoRA r=8, alpha 16, dropout 0 on wq,wk,wv,wo,w1,w2,w3, lr 1e-2, merged for evaluation
              full    full fine-tuning, lr 2e-3 (a 5x lower lr: every weight moves, LoRA's 1e-2 diverges faster)
              qlora   as lora over an NF4 base (--method qlora), merged = dequant(NF4(W)) + BA
              vocab   vocabulary expansion + continued training: a 2k-piece Korean SentencePiece model trained with
                      ``kollama.vocab train`` on NSMC train lines 1..20,000 (never used for training/eval), merged
                      into tok512 (``kollama.vocab merge``), the checkpoint grown (``kollama.vocab resize``), then
                      --trainable lora+embeddings (LoRA as above + every row of tok_embeddings/output), lr 1e-2
  curriculum  none    one stage: the NSMC instructions
              transl  translation-first: stage 1 (TSTEPS steps) = translation instructions built by
                      ``python -m kollama.curriculum build_translation`` from parallel/park_dev and parallel/jhe_dev
                      (both directions, KULLM template), then stage 2 = the NSMC instructions
  + reference rows: the untrained base (tok512) and the untrained resized base (tok512+Korean).

Presets: --quick = 40 steps x 4 examples, 12 translation steps, eval --limit 100 (~20 min on 2 shared cores);
default = 60 x 8, 20 translation steps, --limit 200.

A method whose CLI fails a smoke test (a 2-step run) is left out and listed as "not run: <error>".

Fine-tuning data (exactly): NSMC train lines 20,001.. (1-based), reviews with rating <= 4 (-> "부정") or >= 9
(-> "긍정"; 5-8 dropped, as kollama.eval.tasks.read_nsmc does), the first STEPS x MICRO of them, as KULLM instructions
{"instruction": "다음 영화 리뷰의 감정을 분류하세요. 긍정 또는 부정으로 답하세요.", "input": REVIEW, "output": LABEL},
trained with --template kullm --train_on_inputs (every token of prompt, review and label is a target: the reviews
are the Korean text the model learns from), cutoff 512 tokens, no packing.

Equal budget per arm: the same number of optimizer steps (STEPS) and the same number of examples per step (MICRO,
no accumulation), i.e. the same number of training examples. Arms without curriculum see the identical examples in
the identical order (same characters); the vocab arm needs fewer tokens for them. Curriculum arms spend TSTEPS of
the STEPS on translation examples and STEPS - TSTEPS on the first (STEPS - TSTEPS) x MICRO NSMC examples (same
total steps and examples, fewer NSMC characters). Each stage runs its own warmup-free cosine schedule.

Evaluation (``python -m kollama.evaluate``, merged/full weights, max_seq_len 512): bits per character on the first
LIMIT lines of ud_ko_kaist_dev and of nsmc_dev (held out: never trained on), NSMC / KoBEST COPA / KoBEST BoolQ
zero-shot multiple choice with --limit LIMIT, tokenizer statistics. Report: ``python -m kollama.report``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

INSTRUCTION = "다음 영화 리뷰의 감정을 분류하세요. 긍정 또는 부정으로 답하세요."
LORA_FLAGS = ["--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0", "--lora_targets", "wq,wk,wv,wo,w1,w2,w3"]
METHODS = {  # name: (extra train flags, lr, uses the expanded tokenizer)
    "lora": (["--method", "lora", "--merge"] + LORA_FLAGS, "1e-2", False),
    "full": (["--method", "full"], "2e-3", False),
    "qlora": (["--method", "qlora", "--merge"] + LORA_FLAGS, "1e-2", False),
    "vocab": (["--trainable", "lora+embeddings"] + LORA_FLAGS, "1e-2", True),
}
LOG = []  # (command, seconds, rc)


def from_root(path) -> Path:
    """``path`` relative to the repository root, where main() works and every command runs: what the runs record
    (configs, results, the report) then names no folder of the machine it ran on."""
    return Path(os.path.relpath(Path(path).resolve(), ROOT))


def sh(cmd, log_file: Path = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run a CLI from the repository root; echo it, time it, keep its output."""
    text = " ".join("python" if c == sys.executable else shlex.quote(str(c)) for c in cmd)
    print(f"$ {text}", flush=True)
    t0 = time.time()
    p = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    dt = time.time() - t0
    LOG.append((text, dt, p.returncode))
    out = p.stdout + p.stderr
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text(f"$ {text}\n{out}\n[rc {p.returncode}, {dt:.1f} s]\n", encoding="utf-8")
    tail = "\n".join(out.strip().splitlines()[-4:])
    print(f"  [{dt:.1f} s, rc {p.returncode}] {tail}", flush=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"command failed (rc {p.returncode}): {text}\n{out[-3000:]}")
    return p


def py(*args):
    return [sys.executable, "-m", *args]


def error_line(p: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (p.stdout + p.stderr).strip().splitlines() if ln.strip()]
    errs = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errs or lines or ["(no output)"])[-1].strip()[:400]


def machine() -> dict:
    cpu = "unknown"
    try:
        for ln in open("/proc/cpuinfo"):
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "loadavg": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


def write_lines(path: Path, lines) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def build_data(fx: Path, w: Path, n_train: int, limit: int) -> dict:
    """The fine-tuning JSONL, the held-out text files and the Korean tokenizer corpus."""
    ko = fx / "korean"
    rows, vocab_lines = [], []
    with open(ko / "nsmc_train.jsonl", encoding="utf-8") as f:
        for i, line in enumerate(f):
            d = json.loads(line)
            if i < 20000:
                vocab_lines.append(" ".join(d["text"].split()))
                continue
            if 5 <= d["rating"] <= 8 or not d["text"].strip():
                continue
            rows.append({"instruction": INSTRUCTION, "input": d["text"].strip(),
                         "output": "긍정" if d["rating"] >= 9 else "부정"})
            if len(rows) == n_train:
                break
    sft = w / "nsmc_sft.jsonl"
    write_lines(sft, [json.dumps(r, ensure_ascii=False) for r in rows])
    nsmc_dev = []
    with open(ko / "nsmc_dev.jsonl", encoding="utf-8") as f:
        for line in f:
            t = " ".join(json.loads(line)["text"].split())
            if t:
                nsmc_dev.append(t)
            if len(nsmc_dev) == limit:
                break
    kaist = [ln.strip() for ln in open(ko / "ud_ko_kaist_dev.txt", encoding="utf-8") if ln.strip()][:limit]
    return {"sft": sft, "n_sft": len(rows), "sft_chars": sum(len(r["input"]) for r in rows),
            "positive": sum(r["output"] == "긍정" for r in rows),
            "heldout": [write_lines(w / "heldout_ud_ko_kaist_dev.txt", kaist),
                        write_lines(w / "heldout_nsmc_dev.txt", nsmc_dev)],
            "vocab_corpus": write_lines(w / "ko_vocab_corpus.txt", [x for x in vocab_lines if x])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.environ.get("LLAMA_TEST_DATA", str(ROOT.parent / "shared" / "fixtures")))
    ap.add_argument("--out", default=str(ROOT / "experiments" / "compare_runs"))
    ap.add_argument("--md", default=str(ROOT / "experiments" / "compare_methods.md"))
    ap.add_argument("--quick", action="store_true", help="fewer steps and evaluation items (fits ~20 min on 2 cores)")
    ap.add_argument("--methods", default="lora,full,qlora,vocab")
    for k in ("steps", "micro", "tsteps", "limit"):  # overrides of the presets (for testing the script)
        ap.add_argument(f"--{k}", type=int, default=None)
    ap.add_argument("--md_only", action="store_true", help="rewrite --md from an earlier run's --out folder")
    args = ap.parse_args()
    args.data, args.out, args.md = from_root(args.data), from_root(args.out), from_root(args.md)
    os.chdir(ROOT)
    if args.md_only:
        out = args.out
        s = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        results = {n: json.loads((out / "runs" / rd / "results.json").read_text())["tasks"] for n, rd in s["arms"]}
        s["md_only"] = True
        write_markdown(Path(args.md), out, out / "report", s, results, s["data"])
        print(f"wrote {args.md}")
        return
    argv = " ".join(shlex.quote(a) for a in ["python", "experiments/compare_methods.py", *sys.argv[1:]])
    t_start = time.time()
    steps, micro, tsteps, limit = (40, 4, 12, 100) if args.quick else (60, 8, 20, 200)
    steps, micro, tsteps, limit = (v if o is None else o for v, o in zip((steps, micro, tsteps, limit),
                                                                      (args.steps, args.micro, args.tsteps, args.limit)))
    fx, out = args.data, args.out
    w = out / "work"  # checkpoints, data, run folders: git-ignored
    if w.exists():
        shutil.rmtree(w)
    w.mkdir(parents=True)
    write_lines(out / ".gitignore", ["# only small JSON / Markdown / PNG files are kept; checkpoints etc. live in work/",
                                     "*", "!*/", "!.gitignore", "!*.json", "!*.md", "!*.png", "work/"])
    mach_start = machine()
    print(f"machine: {mach_start}", flush=True)

    # ---- base checkpoint, data, tokenizers ----
    base = w / "stories260K"
    sh(py("llama.convert", "llama2c", fx / "stories260K.bin", base, "--tokenizer", fx / "tok512.model"))
    tok512 = fx / "tok512.model"
    d = build_data(fx, w, steps * micro, limit)
    translation, build_errors = [], []
    for name in ("park_dev", "jhe_dev"):
        dst = w / f"translation_{name}.jsonl"
        p = sh(py("kollama.curriculum", "build_translation", fx / "korean/parallel" / f"{name}.ko",
                  fx / "korean/parallel" / f"{name}.en", dst, "--seed", "0"), check=False)
        if p.returncode == 0:
            translation.append(dst)
        else:
            build_errors.append(f"build_translation {name}: {error_line(p)}")
    sh(py("kollama.vocab", "train", d["vocab_corpus"], "--out", w / "ko2k.model", "--vocab_size", "2000"))
    merge = sh(py("kollama.vocab", "merge", tok512, w / "ko2k.model", w / "tok512_ko.model"))
    base_ko = w / "stories260K_ko"
    resize = sh(py("kollama.vocab", "resize", base, w / "tok512_ko.model", base_ko, "--old_tokenizer", tok512))
    tok_ko = w / "tok512_ko.model"

    # stage files: one-stage (plain) and translation-first
    def stage_file(path: Path, with_translation: bool) -> Path:
        stages = []
        if with_translation:
            stages.append({"name": "translation", "datasets": [{"path": str(p), "template": "kullm"}
                                                               for p in translation], "steps": tsteps})
        stages.append({"name": "nsmc_sft", "datasets": [{"path": str(d["sft"]), "template": "kullm"}],
                       "steps": steps - tsteps if with_translation else steps})
        path.write_text(json.dumps({"stages": stages}, ensure_ascii=False, indent=1), encoding="utf-8")
        return path

    curriculum_file = stage_file(w / "stages_translation_first.json", True)
    common = ["--template", "kullm", "--train_on_inputs", "--cutoff_len", "512", "--micro_batch_size", str(micro),
              "--gradient_accumulation_steps", "1", "--warmup_steps", "0", "--min_lr_ratio", "0.1",
              "--dev_fraction", "0", "--eval_every", "0", "--save_every", "0", "--seed", "0", "--progress", "False"]

    # ---- smoke tests: which methods / the curriculum work at all ----
    not_run, methods = {}, []
    smoke_data = w / "smoke.jsonl"
    write_lines(smoke_data, d["sft"].read_text(encoding="utf-8").splitlines()[:8])
    for m in args.methods.split(","):
        flags, lr, expanded = METHODS[m]
        ck, tk = (base_ko, tok_ko) if expanded else (base, tok512)
        p = sh(py("kollama.train", smoke_data, ck, tk, w / f"smoke_{m}", *flags, *common, "--max_steps", "2",
                  "--lr", lr, "--micro_batch_size", "2"), w / f"smoke_{m}.log", check=False)
        if p.returncode == 0:
            methods.append(m)
        else:
            not_run[m] = error_line(p)
    smoke_stages = w / "smoke_stages.json"
    smoke_stages.write_text(json.dumps({"stages": [
        {"name": "translation", "datasets": [{"path": str(p), "template": "kullm"} for p in translation],
         "steps": 1},
        {"name": "nsmc_sft", "datasets": [{"path": str(smoke_data), "template": "kullm"}], "steps": 1}]}))
    if build_errors:
        curricula = ["none"]
        not_run["translation-first curriculum"] = "; ".join(build_errors)
    else:
        p = sh(py("kollama.train", smoke_stages, base, tok512, w / "smoke_curriculum", "--curriculum",
                  *METHODS["lora"][0], *common, "--lr", "1e-2", "--micro_batch_size", "2"),
               w / "smoke_curriculum.log", check=False)
        curricula = ["none"] + (["transl"] if p.returncode == 0 else [])
        if p.returncode != 0:
            not_run["translation-first curriculum"] = error_line(p)
    shutil.rmtree(w / "smoke_curriculum", ignore_errors=True)
    for m in args.methods.split(","):
        shutil.rmtree(w / f"smoke_{m}", ignore_errors=True)

    # ---- evaluation helper ----
    eval_args = ["--data_dir", fx / "korean", "--text_files", ",".join(str(p) for p in d["heldout"]),
                 "--tasks", "bpc,tokenizer,nsmc,kobest_copa,kobest_boolq", "--limit", str(limit),
                 "--max_seq_len", "512", "--batch_size", "8", "--progress", "False"]

    def evaluate(run_dir: Path, ckpt: Path, tok: Path) -> None:
        sh(py("kollama.evaluate", "--ckpt_dir", ckpt, "--tokenizer_path", tok, *eval_args,
              "--out", run_dir / "results.json"), run_dir / "eval.log")

    arms = []  # (name, run_dir)
    for name, ck, tk in (("base-untrained", base, tok512), ("base+vocab-untrained", base_ko, tok_ko)):
        rd = w / ("ref_" + name.replace("+", "_").replace("-", "_"))
        rd.mkdir()
        evaluate(rd, ck, tk)
        arms.append((name, rd))

    # ---- training runs ----
    train_info = {}
    for cur in curricula:
        for m in methods:
            flags, lr, expanded = METHODS[m]
            ck, tk = (base_ko, tok_ko) if expanded else (base, tok512)
            name = f"{m}{'+transl' if cur == 'transl' else ''}"
            rd = w / name.replace("+", "_")
            if cur == "transl":
                cmd = py("kollama.train", curriculum_file, ck, tk, rd, "--curriculum", *flags, *common, "--lr", lr)
            else:
                cmd = py("kollama.train", d["sft"], ck, tk, rd, *flags, *common, "--lr", lr, "--max_steps", str(steps))
            t0 = time.time()
            p = sh(cmd, w / f"{name.replace('+', '_')}.train.log", check=False)
            if p.returncode != 0:
                not_run[name] = f"training failed: {error_line(p)}"
                continue
            secs = time.time() - t0
            recs = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines() if x.strip()]
            losses = [r["loss"] for r in recs if "loss" in r and "event" not in r]
            cfg = json.loads((rd / "config.json").read_text())
            trained = rd / ("model" if m == "full" else "merged")
            # kollama.report reads these keys from a summary.json in the run folder
            n_trainable = _trainable_params(p.stdout, cfg, trained)
            (rd / "summary.json").write_text(json.dumps({"train_wall_time_s": round(secs, 1),
                                                         "trainable_params": n_trainable}))
            train_info[name] = {"steps": len(losses), "first_loss": losses[0] if losses else None,
                                "last_loss": losses[-1] if losses else None, "train_s": round(secs, 1),
                                "trainable_params": n_trainable, "lr": lr, "command": " ".join(map(str, cmd))}
            evaluate(rd, trained, tk)
            arms.append((name, rd))

    # ---- report ----
    rep_dir = out / "report"
    if rep_dir.exists():
        shutil.rmtree(rep_dir)
    sh(py("kollama.report", *[rd for _, rd in arms], "--out_dir", rep_dir, "--names", ",".join(n for n, _ in arms)))
    results = {}
    for name, rd in arms:
        keep = out / "runs" / rd.name
        keep.mkdir(parents=True, exist_ok=True)
        for f in ("results.json", "config.json", "summary.json"):
            if (rd / f).is_file():
                shutil.copy(rd / f, keep / f)
        results[name] = json.loads((rd / "results.json").read_text())["tasks"]
    mach_end = machine()
    total = time.time() - t_start
    summary = {"command": argv, "wall_time_s": round(total, 1), "machine_start": mach_start, "machine_end": mach_end,
               "quick": args.quick, "data_dir": str(fx), "steps": steps,
               "settings": "custom" if any(v is not None for v in (args.steps, args.micro, args.tsteps, args.limit))
               else ("--quick" if args.quick else "default"), "micro_batch": micro, "translation_steps": tsteps,
               "eval_limit": limit, "methods_run": methods, "curricula_run": curricula, "not_run": not_run,
               "train": train_info, "data": {k: v if isinstance(v, int) else str(v) for k, v in d.items()},
               "arms": [[n, rd.name] for n, rd in arms],
               "merge": merge.stdout.strip(), "resize": resize.stdout.strip(),
               "commands": [{"cmd": c, "seconds": round(s, 1), "rc": rc} for c, s, rc in LOG]}
    (out / "summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1), encoding="utf-8")
    write_markdown(Path(args.md), out, rep_dir, summary, results, d)
    print(f"done in {total / 60:.1f} min; wrote {args.md}")


def _trainable_params(stdout: str, cfg: dict, trained: Path):
    """From the trainer's 'trainable params: N' line (LoRA runs), else the model size (full fine-tuning)."""
    for ln in stdout.splitlines():
        if ln.startswith("trainable params:"):
            return int(ln.split("||")[0].split(":")[1].replace(",", "").strip())
    try:
        from safetensors import safe_open

        with safe_open(str(next(trained.glob("*.safetensors"))), "pt") as f:
            total = 0
            for k in f.keys():
                n = 1
                for s in f.get_slice(k).get_shape():
                    n *= s
                total += n
            return total
    except Exception:  # noqa: BLE001 - informative only
        return None


def _nsmc_positive_share(s: dict):
    """Share of positive labels among the NSMC dev items the evaluation used (kollama.eval.tasks.read_nsmc, --limit)."""
    try:
        from kollama.eval.tasks import read_nsmc

        items = read_nsmc(Path(s["data_dir"]) / "korean" / "nsmc_dev.jsonl", [])[: s["eval_limit"]]
        return sum(it.gold for it in items) / len(items)
    except Exception:  # noqa: BLE001 - informative only
        return None


def bpc_of(tasks: dict, name: str):
    try:
        return tasks["bpc"][name]["bits_per_char"]
    except KeyError:
        return None


def acc_of(tasks: dict, task: str):
    return tasks.get(task, {}).get("acc")


def write_markdown(md: Path, out: Path, rep_dir: Path, s: dict, results: dict, d: dict) -> None:
    rel = os.path.relpath(rep_dir, md.parent)
    report_md = (rep_dir / "report.md").read_text(encoding="utf-8")
    table = "\n".join(ln for ln in report_md.splitlines() if ln.startswith("|"))
    charts = sorted(p.name for p in rep_dir.glob("*.png"))
    m0, m1 = s["machine_start"], s["machine_end"]
    head = ["| run | bpc KAIST ↓ | bpc NSMC dev ↓ | NSMC acc | COPA acc | BoolQ acc |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    for name, t in results.items():
        head.append(f"| {name} | {fmt(bpc_of(t, 'heldout_ud_ko_kaist_dev'))} | {fmt(bpc_of(t, 'heldout_nsmc_dev'))} | "
                    f"{fmt(acc_of(t, 'nsmc'))} | {fmt(acc_of(t, 'kobest_copa'))} | {fmt(acc_of(t, 'kobest_boolq'))} |")
    trained = {n: t for n, t in results.items() if not n.startswith("base")}
    best = min(trained.items(), key=lambda kv: bpc_of(kv[1], "heldout_ud_ko_kaist_dev") or 1e9)[0] if trained else None
    cur_lines = []
    for m in s["methods_run"]:
        a, b = results.get(m), results.get(f"{m}+transl")
        if a and b:
            da = bpc_of(b, "heldout_ud_ko_kaist_dev") - bpc_of(a, "heldout_ud_ko_kaist_dev")
            dn = bpc_of(b, "heldout_nsmc_dev") - bpc_of(a, "heldout_nsmc_dev")
            cur_lines.append(f"- {m}: translation-first changes held-out bpc by {da:+.3f} (KAIST) / {dn:+.3f} "
                             f"(NSMC dev) bits/char.")
    b0 = bpc_of(results.get("base-untrained", {}), "heldout_ud_ko_kaist_dev")
    bv = bpc_of(results.get("base+vocab-untrained", {}), "heldout_ud_ko_kaist_dev")
    tb = [bpc_of(t, "heldout_ud_ko_kaist_dev") for t in trained.values()]
    tb = [v for v in tb if v is not None]
    base_line = (f"On KAIST the untrained model scores {fmt(b0)} bits/char (tok512: Hangul only as UTF-8 byte pieces, "
                 f"which TinyStories training practically never used), the untrained resized model {fmt(bv)} (new rows = mean of their byte "
                 f"pieces), the trained arms {fmt(min(tb))}-{fmt(max(tb))}." if tb and b0 is not None else "")
    pos = _nsmc_positive_share(s)
    nsmc_line = (f"the {s['eval_limit']} NSMC dev items are {pos:.1%} positive: always answering 긍정 scores "
                 f"{pos:.3f}, always 부정 {1 - pos:.3f}, and a macro-F1 near 0.4 marks such a constant answer (see the "
                 f"full table)." if pos is not None else "a model that prefers one label word scores that label's share.")
    deltas = []
    for m in s["methods_run"]:
        a, b = results.get(m), results.get(f"{m}+transl")
        if a and b:
            deltas.append(bpc_of(b, "heldout_ud_ko_kaist_dev") - bpc_of(a, "heldout_ud_ko_kaist_dev"))
    if not deltas:
        transl_line = "not measured (see Methods not run)."
    elif all(x > 0 for x in deltas):
        transl_line = (f"it made held-out KAIST bits/char WORSE for every method ({', '.join(f'{x:+.2f}' for x in deltas)}"
                       f"). At this budget the {s['translation_steps']} translation steps replace NSMC steps, and what they "
                       f"teach does not make up for that here (a different domain, half of it English; with tok512 many "
                       f"translation rows are cut at 512 byte-level tokens). One seed: small differences are noise.")
    elif all(x < 0 for x in deltas):
        transl_line = f"it lowered held-out KAIST bits/char for every method ({', '.join(f'{x:+.2f}' for x in deltas)})."
    else:
        transl_line = (f"mixed ({', '.join(f'{x:+.2f}' for x in deltas)} bits/char on KAIST, per method in the order "
                       f"{', '.join(s['methods_run'])}): no consistent direction at this budget, and with one seed these "
                       f"differences are not shown to exceed run-to-run noise.")
    tr_rows = ["| run | lr | steps | first loss | last loss | trainable params | train wall (s) |",
               "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for n, t in s["train"].items():
        tr_rows.append(f"| {n} | {t['lr']} | {t['steps']} | {fmt(t['first_loss'])} | {fmt(t['last_loss'])} | "
                       f"{t['trainable_params'] if t['trainable_params'] is not None else '–'} | {t['train_s']} |")
    not_run = "\n".join(f"- **{k}**: not run: `{v}`" for k, v in s["not_run"].items()) or "- none: every arm ran."
    slowest = sorted(s["commands"], key=lambda c: -c["seconds"])[:3]
    md_note = (" The text was rewritten afterwards from that run's saved outputs (`--md_only`); no number changed."
               if s.get("md_only") else "")
    text = f"""# Korean adaptation methods at equal budget (stories260K, CPU scale)

Generated by `experiments/compare_methods.py`; numbers exactly as they came out of one run (seed 0).{md_note}

**Read this first.** The model is stories260K: 260K parameters, trained only on English TinyStories, with a
512-piece tokenizer in which every Hangul syllable is 3 UTF-8 byte pieces. Its multiple-choice accuracies are at
or near chance (NSMC 2-way, COPA 2-way, BoolQ 2-way: 0.5) before and after a few dozen steps of training; the
differences between arms there are noise on {s['eval_limit']} items. **The figure that means something is held-out
Korean bits per character** (comparable across tokenizers), on UD Korean-KAIST dev (news/encyclopedic text, a
different domain from training) and NSMC dev reviews (the training domain, different reviews).

## Command, time, machine

    {s['command']}

* wall time: **{s['wall_time_s'] / 60:.1f} min** in total ({s['settings']} settings: {s['steps']} steps x {s['micro_batch']}
  examples, {s['translation_steps']} translation steps, eval limit {s['eval_limit']})
* machine: {m0['cpu']}, {m0['cores']} cores (torch threads {m0['torch_threads']}), shared with other jobs: load
  average {m0['loadavg']} at the start, {m1['loadavg']} at the end; Python {m0['python']}, torch {m0['torch']},
  {m0['platform']}
* every CLI call, its time and exit code: `compare_runs/summary.json` (the slowest: {', '.join(f"{c['seconds']:.0f} s" for c in slowest)}).

## Setup

* Base: `python -m llama.convert llama2c stories260K.bin OUT --tokenizer tok512.model` (once).
* Fine-tuning data: NSMC train lines 20,001 on, ratings <= 4 -> `부정`, >= 9 -> `긍정` (5-8 dropped), the first
  {d['n_sft']} reviews ({d['positive']} positive, {d['sft_chars']:,} review characters), as KULLM instructions
  `{{"instruction": "{INSTRUCTION}", "input": REVIEW, "output": "긍정"|"부정"}}`,
  `--template kullm --train_on_inputs` (loss on every token: prompt, review and label), cutoff 512, no packing.
* Budget, equal for every arm: **{s['steps']} optimizer steps x {s['micro_batch']} examples per step** (no
  accumulation) = {s['steps'] * s['micro_batch']} training examples. Arms without curriculum see the identical
  examples in the identical order (identical characters; the vocab arm needs fewer tokens for them). Curriculum
  arms (`+transl`) spend the first {s['translation_steps']} steps on translation instructions and the remaining
  {s['steps'] - s['translation_steps']} on the first {(s['steps'] - s['translation_steps']) * s['micro_batch']} NSMC
  examples (same steps and examples, fewer NSMC characters).
* Translation stage: `python -m kollama.curriculum build_translation` on parallel/park_dev.ko|en and
  parallel/jhe_dev.ko|en (both directions, mixed phrasings), template kullm, the two files mixed 1:1 (stage weights 1 and 1).
* Methods: `lora` = LoRA r 8, alpha 16, dropout 0 on wq,wk,wv,wo,w1,w2,w3, lr 1e-2, `--merge`; `full` = every
  weight, lr 2e-3; `qlora` = `--method qlora` (NF4 base) with the LoRA settings, merged onto dequant(NF4(W));
  `vocab` = a 2,000-piece Korean BPE model (`kollama.vocab train` on NSMC train lines 1-20,000, never trained on
  or evaluated) merged into tok512 (`kollama.vocab merge`: {s['merge']}), the checkpoint grown
  (`kollama.vocab resize`: {s['resize']}), then `--trainable lora+embeddings` (the LoRA above + all rows of
  tok_embeddings/output), lr 1e-2. The vocab arm is "vocabulary expansion + continued training" on the same
  instruction data with every token a target (what `--task pretrain` would do with that text, without packing);
  the number of steps is the same as the others, there is no separate pretraining phase.
* All: AdamW, no warmup, cosine to 0.1 x lr (per stage with the curriculum), clipping 1.0, seed 0, fp32, CPU.
* Evaluation: `python -m kollama.evaluate --tasks bpc,tokenizer,nsmc,kobest_copa,kobest_boolq --limit
  {s['eval_limit']} --max_seq_len 512` on the merged (LoRA/QLoRA/vocab) or full weights; bpc on the first
  {s['eval_limit']} lines of ud_ko_kaist_dev and of nsmc_dev; zero-shot multiple choice on the first
  {s['eval_limit']} usable items of each dev set. Report: `python -m kollama.report` (full table below, charts in
  `{rel}/`).

## Headline: held-out Korean bits per character (lower is better)

{chr(10).join(head)}

![bits per char, KAIST]({rel}/metric_bpc_heldout_ud_ko_kaist_dev_bits_per_char.png)
![bits per char, NSMC dev]({rel}/metric_bpc_heldout_nsmc_dev_bits_per_char.png)

Lowest KAIST bits/char among the trained arms: **{best}**.
{chr(10).join(cur_lines)}

## Training

{chr(10).join(tr_rows)}

![training loss]({rel}/loss.png)

## Methods not run

{not_run}

## Full table (`python -m kollama.report`)

{table}

↑ higher is better, ↓ lower is better. Charts: {', '.join(f'[{c}]({rel}/{c})' for c in charts)}.

## Reading

* Bits per character is the measure that moves. {base_line} Compare the arms on the bpc columns.
* The vocab arms are measured with their own (expanded) tokenizer; bits per character is comparable across
  tokenizers, token perplexity in the full table is not.
* The accuracies are near chance for every arm, as expected for a 260K-parameter English TinyStories model. NSMC
  accuracy sits far from 0.5 because {nsmc_line} Do not read method rankings into the accuracies.
* Translation-first at equal steps: {transl_line}
* Not separated here: learning rates were set once per method (full fine-tuning 2e-3, the others 1e-2), so "full vs
  LoRA" mixes the method with its lr; the vocab arm's trainable set is the largest (every embedding/output row).
* One seed, one small budget, learning rates set once per method (not tuned per arm): this checks that the
  pipeline runs end to end and shows the direction of the effects at toy scale, not how a 7B model would respond.
"""
    md.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
