"""Compare runs: one Markdown table of every metric, a bar chart per metric and the training loss curves.

    python -m kollama.report RUN_DIR [RUN_DIR ...] [--out_dir report] [--names a,b]

A RUN_DIR may hold (each optional, missing values print as "–"):
* ``results.json`` from ``python -m kollama.evaluate`` (or any ``*results*.json``; a RUN_DIR may also be that file);
* ``config.json`` from ``python -m kollama.train``: method, data, tokenizer_path;
* ``metrics.jsonl`` from the trainer: {step, loss, lr, tokens_per_s, ...} and {step, dev_loss} records, drawn as
  loss curves.
Trainable parameters, training tokens and training wall time are read from the keys ``trainable_params``,
``train_tokens`` and ``train_wall_time_s`` (or ``wall_time_s``) of config.json, a ``summary.json``, or the last
metrics.jsonl record that has them.

Writes OUT_DIR/report.md (atomically), and with matplotlib (an optional extra) OUT_DIR/metric_*.png and
OUT_DIR/loss.png; without it the report says so and contains the table only.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from llama.errors import UserError, run_cli
from llama.files import atomic_write, atomic_write_bytes

DASH = "–"
# The metrics worth a row (and a chart); counts and settings in results.json stay out of the table.
HEADLINE = ("acc", "acc_norm", "macro_f1", "bits_per_char", "bits_per_byte", "token_ppl", "chrf++", "bleu",
            "tokens_per_char", "tokens_per_hangul_syllable", "byte_fallback_share", "korean_answer_rate",
            "hangul_share_mean")
LOWER_IS_BETTER = {"bits_per_char", "bits_per_byte", "token_ppl", "tokens_per_char", "tokens_per_hangul_syllable",
                   "byte_fallback_share"}
INFO_KEYS = {"trainable_params": ("trainable_params",), "train_tokens": ("train_tokens", "tokens_seen"),
             "train_wall_time_s": ("train_wall_time_s", "wall_time_s")}


class ReportError(UserError):
    """A usage problem; the message says what to change."""


def _read_json(path: Path, problems: List[str]) -> Optional[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"{path}: unreadable ({e})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a JSON object")
        return None
    return data


def _read_jsonl(path: Path, problems: List[str]) -> List[dict]:
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                # A trainer killed mid-write leaves a torn last line; the rest of the curve is still good.
                problems.append(f"{path}:{lineno}: not valid JSON, skipped")
                continue
            if isinstance(rec, dict):
                rows.append(rec)
    return rows


def load_run(path, name: Optional[str] = None, problems: Optional[List[str]] = None) -> dict:
    """Everything the report needs about one run folder (or one results.json file)."""
    problems = [] if problems is None else problems
    path = Path(str(path))
    if not path.exists():
        raise ReportError(f"run {path} does not exist; pass run folders (or results.json files)")
    folder = path.parent if path.is_file() else path
    results_file = path if path.is_file() else folder / "results.json"
    if not results_file.is_file():
        found = sorted(folder.glob("*results*.json"))
        results_file = found[0] if found else None
    results = (_read_json(results_file, problems) if results_file else None) or {}
    config = (_read_json(folder / "config.json", problems) if (folder / "config.json").is_file() else None) or {}
    summary = (_read_json(folder / "summary.json", problems) if (folder / "summary.json").is_file() else None) or {}
    metrics = _read_jsonl(folder / "metrics.jsonl", problems) if (folder / "metrics.jsonl").is_file() else []
    empty = not (results or config or metrics)
    if empty:
        problems.append(f"{path}: nothing readable (results.json, config.json or metrics.jsonl)")
    meta = results.get("meta", {}) if isinstance(results.get("meta"), dict) else {}
    info = {"method": _method_label(config), "data": config.get("data"),
            "tokenizer": config.get("tokenizer_path") or meta.get("tokenizer_path"),
            "eval_wall_time_s": meta.get("wall_time_s")}
    for key, names in INFO_KEYS.items():
        info[key] = _first(names, [config, summary] + [r for r in reversed(metrics)])
    return {"name": name or (folder.name if path.is_dir() else path.stem), "info": info,
            "metrics": flatten_metrics(results.get("tasks", {})), "loss": _curve(metrics, "loss"),
            "dev_loss": _curve(metrics, "dev_loss"), "empty": empty}


def _method_label(config: dict) -> Optional[str]:
    """The trainer's method, with the trainable set and task when they say more (lora+embeddings, pretrain)."""
    method = config.get("method")
    trainable = config.get("trainable")
    if method and trainable and trainable != method:
        method = f"{method} ({trainable})"
    if method and config.get("task") == "pretrain":
        method = f"{method}, pretrain"
    return method


def _first(names: Sequence[str], sources: Sequence[dict]):
    for src in sources:
        for n in names:
            if src.get(n) is not None:
                return src[n]
    return None


def _curve(records: List[dict], key: str) -> List[Tuple[float, float]]:
    return [(r["step"], r[key]) for r in records
            if isinstance(r.get("step"), (int, float)) and isinstance(r.get(key), (int, float))]


def flatten_metrics(tasks: dict) -> Dict[str, float]:
    """{"task metric" or "task/subset metric": value} for the HEADLINE metrics of results.json's "tasks"."""
    out: Dict[str, float] = {}
    for task, m in tasks.items() if isinstance(tasks, dict) else []:
        if not isinstance(m, dict):
            continue
        for k, v in m.items():
            if k in HEADLINE and isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{task} {k}"] = float(v)
            elif isinstance(v, dict):  # per-file results: bpc, tokenizer, translation
                for k2, v2 in v.items():
                    if k2 in HEADLINE and isinstance(v2, (int, float)) and not isinstance(v2, bool):
                        out[f"{task}/{k} {k2}"] = float(v2)
    return out


def _fmt(v) -> str:
    if v is None or v == "" or v == []:
        return DASH
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(Path(str(x)).name for x in v)
    s = str(v)
    return Path(s).name if os.sep in s else s


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def markdown_table(runs: Sequence[dict]) -> str:
    """Rows: run information, then every metric any run has; columns: runs."""
    names = [_cell(r["name"]) for r in runs]
    lines = ["| | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(runs)]
    info_rows = [("method", "method"), ("data", "data"), ("tokenizer", "tokenizer"),
                 ("trainable params", "trainable_params"), ("train tokens", "train_tokens"),
                 ("train wall time (s)", "train_wall_time_s"), ("eval wall time (s)", "eval_wall_time_s")]
    for label, key in info_rows:
        cells = [r["info"].get(key) for r in runs]
        if key.endswith("wall_time_s"):  # seconds: one decimal says enough
            cells = [f"{v:.1f}" if isinstance(v, (int, float)) else v for v in cells]
        lines.append(f"| {label} | " + " | ".join(_cell(_fmt(v)) for v in cells) + " |")
    for metric in metric_names(runs):
        arrow = "↓" if metric.split(" ")[-1] in LOWER_IS_BETTER else "↑"
        lines.append(f"| {_cell(metric)} {arrow} | " + " | ".join(_fmt(r["metrics"].get(metric)) for r in runs)
                     + " |")
    return "\n".join(lines)


def metric_names(runs: Sequence[dict]) -> List[str]:
    seen: List[str] = []
    for r in runs:
        seen += [m for m in r["metrics"] if m not in seen]
    return seen


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", s.replace("++", "pp")).strip("_")


def _save_figure(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def plot(runs: Sequence[dict], out_dir: Path) -> Tuple[List[Path], Optional[str]]:
    """Bar chart per metric and the loss curves; (written files, None) or ([], why not)."""
    try:
        # matplotlib.figure.Figure needs no pyplot and no global backend switch: no state leaks into the caller.
        from matplotlib.figure import Figure
    except ImportError as e:
        return [], f"charts skipped: matplotlib is not installed ({e}); pip install matplotlib"
    written = []
    names = [r["name"] for r in runs]
    for metric in metric_names(runs):
        values = [r["metrics"].get(metric) for r in runs]
        fig = Figure(figsize=(max(4.0, 1.2 * len(runs) + 2), 3.2))
        ax = fig.subplots()
        ax.bar(range(len(runs)), [v if v is not None else 0.0 for v in values], color="tab:blue")
        for i, v in enumerate(values):
            ax.annotate(DASH if v is None else f"{v:.3g}", (i, v or 0.0), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(runs)), names, rotation=20, ha="right", fontsize=8)
        lower = metric.split(" ")[-1] in LOWER_IS_BETTER
        ax.set_title(f"{metric} ({'lower' if lower else 'higher'} is better)", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"metric_{_slug(metric)}.png"
        _save_figure(fig, path)
        written.append(path)
    if any(r["loss"] or r["dev_loss"] for r in runs):
        fig = Figure(figsize=(6.4, 3.6))
        ax = fig.subplots()
        for i, r in enumerate(runs):
            color = f"C{i % 10}"
            if r["loss"]:
                ax.plot(*zip(*r["loss"]), color=color, label=f"{r['name']} train")
            if r["dev_loss"]:
                ax.plot(*zip(*r["dev_loss"]), color=color, linestyle="--", marker="o", label=f"{r['name']} dev")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / "loss.png"
        _save_figure(fig, path)
        written.append(path)
    return written, None


def report(*run_dirs, out_dir: str = "report", names=None) -> Path:
    """Write OUT_DIR/report.md (+ charts) comparing the runs; returns the report's path.

    Args:
        run_dirs (str): one or more run folders (results.json from kollama.evaluate, config.json and metrics.jsonl
            from kollama.train, each optional) or results.json files, one table column each, e.g. runs/lora runs/full
        out_dir (str, default "report"): folder for report.md and, with matplotlib, metric_*.png and loss.png
            (created if missing), e.g. --out_dir report/
        names (str, default None): comma-separated column names, one per RUN_DIR in order; None names each run
            after its folder (or its file's stem), e.g. --names lora,full
    """
    if not run_dirs:
        raise ReportError("no runs given; pass one or more run folders: python -m kollama.report RUN_DIR...")
    if isinstance(names, str):
        names = names.split(",")
    if names is not None and len(names) != len(run_dirs):
        raise ReportError(f"--names has {len(names)} entries for {len(run_dirs)} runs")
    problems: List[str] = []
    runs = [load_run(p, names[i] if names else None, problems) for i, p in enumerate(run_dirs)]
    if all(r["empty"] for r in runs):
        raise ReportError(f"no run has anything to report ({'; '.join(problems[:3])}); pass run folders written by "
                          f"kollama.train or kollama.evaluate")
    out = Path(str(out_dir))
    out.mkdir(parents=True, exist_ok=True)
    charts, why_not = plot(runs, out)
    md = ["# KoLlama2 runs", "", markdown_table(runs), "",
          "↑ higher is better, ↓ lower is better; – = not available for that run.", ""]
    if why_not:
        md += [f"_Note: {why_not}._", ""]
    loss_chart = [c for c in charts if c.name == "loss.png"]
    if loss_chart:
        md += ["## Training loss", "", "![training loss](loss.png)", ""]
    bars = [c for c in charts if c.name != "loss.png"]
    if bars:
        md += ["## Metrics", ""] + [f"![{c.stem}]({c.name})" for c in bars] + [""]
    if problems:
        md += ["## Problems", ""] + [f"- {_cell(p)}" for p in problems] + [""]
        for p in problems:
            print(f"warning: {p}", file=sys.stderr)
    path = atomic_write_bytes(out / "report.md", "\n".join(md).encode("utf-8"))
    print(f"wrote {path}" + (f" and {len(charts)} charts" if charts else ""))
    return path


def main(argv: Optional[List[str]] = None) -> None:
    run_cli(report, argv, "python -m kollama.report", serialize=lambda _: None)


if __name__ == "__main__":
    main()
