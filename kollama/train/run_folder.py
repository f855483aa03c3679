"""The run folder: its first rule (a new run never starts on top of a previous one) and its files (``RunLog``).

``--out_dir`` must be new or empty unless ``--resume`` (continue the run in it) or ``--overwrite`` (the previous run
is moved aside to ``OUT_DIR.replaced-YYYYmmdd-HHMMSS``, whole, and the new run starts in an empty folder; nothing is
deleted). Every rank checks the same folder, so all raise the same error; only rank 0 moves anything."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch.distributed as dist

from kollama.train.config import ConfigError
from llama.files import atomic_write_bytes, check_writable, fsync_dir, fsync_file, write_json

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "checkpoints", "adapter", "model", "merged")


def prepare_out_dir(out: Path, resume: bool, overwrite: bool, is_main: bool) -> Optional[Path]:
    """Check ``out`` against --resume / --overwrite; returns where an overwritten run was moved, if one was."""
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out_dir {out} is a file, not a folder; choose another --out_dir")
    run_files = [n for n in held if n in RUN_FILES]
    if resume:
        if not (out / "checkpoints").is_dir():
            raise ConfigError(f"--resume: {out} holds no checkpoints/ folder, so there is nothing to continue; "
                              f"run without --resume to start")
        return None
    if not held:  # created when the run writes its first file, so a run that fails to start leaves nothing
        check_writable(out, "--out_dir")
        return None
    what = f"a previous run ({', '.join(run_files)})" if run_files else f"other files ({', '.join(held[:5])})"
    if not overwrite:
        raise ConfigError(f"--out_dir {out} holds {what}; pass --resume to continue it, --overwrite to move it aside "
                          f"and start over, or choose a new --out_dir")
    moved = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    if is_main:
        n = 1
        while moved.exists():  # two overwrites within a second
            moved, n = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
        out.rename(moved)
        out.mkdir(parents=True)
    _barrier()
    return moved


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------------
# Run files: config.json and metrics.jsonl (rank 0 only)
# ---------------------------------------------------------------------------------------------------------------
class RunLog:
    """The run's files in ``out_dir``. Only the main process writes; on the others every method is a no-op."""

    def __init__(self, out_dir, is_main: bool):
        self.out, self.is_main = Path(out_dir), bool(is_main)
        self.metrics = self.out / "metrics.jsonl"

    def write_json(self, name: str, obj) -> None:
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.out / name, obj)

    def append_metrics(self, record: dict) -> None:
        """One JSON line, flushed to the OS (made durable by ``sync``)."""
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.metrics, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
                f.flush()

    def sync(self) -> None:
        """fsync metrics.jsonl (the trainer calls this at each checkpoint and at the end)."""
        if self.is_main and self.metrics.exists():
            fsync_file(self.metrics)
            fsync_dir(self.out)

    def read_metrics(self) -> List[dict]:
        """The complete records (a torn or undecodable line is skipped)."""
        return [r for r, _ in _parse_lines(self.metrics)[0]]

    def repair_metrics(self, step: int) -> Optional[str]:
        """On resume at ``step``: keep the complete records with step <= ``step``; drop later ones (logged by the
        interrupted run after its last checkpoint) and a torn last line. Returns a notice, or None if the file
        was already clean (then it is not touched)."""
        if not self.is_main or not self.metrics.exists():
            return None
        records, torn = _parse_lines(self.metrics)
        keep = [line for r, line in records if not isinstance(r.get("step"), (int, float)) or r["step"] <= step]
        dropped = len(records) - len(keep)
        if not dropped and not torn:
            return None
        atomic_write_bytes(self.metrics, b"".join(line + b"\n" for line in keep))
        parts = [f"dropped {dropped} record{'s' if dropped != 1 else ''} logged after step {step}"] if dropped else []
        if torn:
            parts.append(f"removed {torn} torn line{'s' if torn != 1 else ''} (an incomplete write of an "
                         f"interrupted run)")
        return f"{self.metrics}: " + " and ".join(parts)


def _parse_lines(path: Path) -> Tuple[List[Tuple[dict, bytes]], int]:
    """([(record, raw line)], number of torn lines): a line is torn if it is not a JSON object, or is the last
    one and lacks its newline (the process died mid-write)."""
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: bytes after the last newline (b"" if the file ends cleanly)
    records, torn = [], int(bool(tail.strip()))
    for line in complete:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append((record, line))
        else:
            torn += 1
    return records, torn
