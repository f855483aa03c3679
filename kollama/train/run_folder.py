"""The run folder's first rule: a new run never starts on top of a previous one.

``--out_dir`` must be new or empty unless ``--resume`` (continue the run in it) or ``--overwrite`` (the previous run
is moved aside to ``OUT_DIR.replaced-YYYYmmdd-HHMMSS``, whole, and the new run starts in an empty folder; nothing is
deleted). Every rank checks the same folder, so all raise the same error; only rank 0 moves anything."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from kollama.train.config import ConfigError
from llama.files import check_writable

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
