"""Trainer state for exact resume (``out_dir/checkpoints/step-NNNNNN/``), the run's config.json / metrics.jsonl, and
its final outputs (``adapter/``, ``merged/``, ``model/``).

Files: ``weights.mpRR.safetensors`` (this model-parallel rank's trainable tensors, by parameter name),
``optimizer.mpRR.pt``, ``scheduler.pt``, ``rng.rankGGG.pt`` (torch CPU/CUDA and Python RNG of every global rank) and
``trainer_state.json`` (step = the data position, the run's config and a data fingerprint). Data-parallel replicas
hold equal weights and optimizer state, so only data-parallel rank 0 of each model-parallel slot writes those.
Under ``--fsdp`` no two ranks hold the same shard: every rank writes its own ``weights.mpRR.dpDD.safetensors`` and
``optimizer.mpRR.dpDD.pt`` (plain local tensors), and resuming needs the same world (config ``world_size``).

All ranks write into ``.step-NNNNNN.tmp`` and rank 0 renames it to ``step-NNNNNN`` after a barrier, so a folder under
the final name is always complete (the ranks must share the file system, as on one node). Older folders beyond
``keep`` are deleted only after the new one is in place.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from kollama.distributed import local
from llama.checkpoint import write_checkpoint
from llama.parallel import (get_model_parallel_group, get_model_parallel_rank, get_model_parallel_src_rank,
                            get_model_parallel_world_size)

_STEP_RE = re.compile(r"^step-(\d+)$")
# A resumed run must agree on everything that decides the data order and the update; the rest may change.
MUST_MATCH = ("method", "template", "seed", "packing", "block_size", "cutoff_len", "micro_batch_size",
              "gradient_accumulation_steps", "total_steps", "global_batch", "world_size", "model_parallel_size",
              "lr", "weight_decay", "warmup_steps", "min_lr_ratio", "max_grad_norm", "lora_r", "lora_alpha",
              "lora_dropout", "lora_targets", "use_rslora", "train_on_inputs", "dev_fraction", "fsdp")


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; nothing was updated and the last checkpoint is intact."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def latest_checkpoint(root) -> Optional[Path]:
    root = Path(root)
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name))
             and (p / "trainer_state.json").is_file()]
    return max(found)[1] if found else None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _shard_suffix(mp_rank: int, dp_rank: int, fsdp: bool) -> str:
    return f"mp{mp_rank:02d}.dp{dp_rank:02d}" if fsdp else f"mp{mp_rank:02d}"


def save_trainer_state(root, step: int, model, named, optimizer, scheduler, config: dict, fingerprint,
                       rank: int, mp_rank: int, dp_rank: int, keep: int = 2, fsdp: bool = False) -> Path:
    root = Path(root)
    final, tmp = root / f"step-{step:06d}", root / f".step-{step:06d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a crash mid-save
        tmp.mkdir(parents=True)
    _barrier()
    if dp_rank == 0 or fsdp:
        suffix = _shard_suffix(mp_rank, dp_rank, fsdp)
        tensors = {n: local(p).detach().to("cpu").contiguous() for n, p in named}
        save_file(tensors, str(tmp / f"weights.{suffix}.safetensors"))
        optim_state = optimizer.state_dict()
        if fsdp:
            from kollama.fsdp import local_optimizer_state

            optim_state = local_optimizer_state(optim_state)
        torch.save(optim_state, tmp / f"optimizer.{suffix}.pt")
    torch.save(_rng_state(), tmp / f"rng.rank{rank:03d}.pt")
    _barrier()
    if rank == 0:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        state = {"step": step, "config": config, "fingerprint": list(fingerprint)}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, ensure_ascii=False, default=str) + "\n")
        if final.exists():  # the same step saved again (a resumed run): replace the old folder
            old = root / f".step-{step:06d}.old"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        if keep and keep > 0:
            steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)))
            for _, p in steps[:-keep]:
                shutil.rmtree(p, ignore_errors=True)
    _barrier()
    return final


def load_trainer_state(path, model, named, optimizer, scheduler, config: dict, fingerprint, rank: int,
                       mp_rank: int, dp_rank: int = 0, fsdp: bool = False) -> int:
    """Restore weights, optimizer, scheduler and this rank's RNG from ``path``; returns the step to continue at."""
    path = Path(path)
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a trainer checkpoint (no trainer_state.json); pass a "
                                f"checkpoints/step-NNNNNN folder or --resume True")
    state = json.loads(state_file.read_text())
    saved = state["config"]
    diff = {k: (saved.get(k), config.get(k)) for k in MUST_MATCH if saved.get(k) != json.loads(
        json.dumps(config.get(k), default=str))}
    if diff:
        raise ValueError(f"cannot resume from {path}: these settings differ from the checkpoint's "
                         f"(saved, now): {diff}; rerun with the saved values or start a new --out_dir")
    if list(state["fingerprint"]) != list(fingerprint):
        raise ValueError(f"cannot resume from {path}: the training data differ (rows, tokens, dev rows "
                         f"{state['fingerprint']} saved vs {list(fingerprint)} now); resume with the same --data")
    suffix = _shard_suffix(mp_rank, dp_rank, fsdp)
    tensors = load_file(str(path / f"weights.{suffix}.safetensors"))
    names = {n for n, _ in named}
    if set(tensors) != names:
        raise ValueError(f"{path}: saved tensors do not match the model's trainable parameters "
                         f"(e.g. {sorted(set(tensors) ^ names)[:5]})")
    with torch.no_grad():
        for n, p in named:
            held = local(p)
            if held.shape != tensors[n].shape:
                raise ValueError(f"{path}: {n} was saved with shape {tuple(tensors[n].shape)} but this process "
                                 f"holds {tuple(held.shape)}; resume with the same world and parallel sizes")
            held.copy_(tensors[n])
    optim_state = torch.load(path / f"optimizer.{suffix}.pt", map_location="cpu", weights_only=True)
    if fsdp:
        from kollama.fsdp import sharded_optimizer_state

        optim_state = sharded_optimizer_state(optim_state, optimizer)
    optimizer.load_state_dict(optim_state)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    _set_rng_state(torch.load(path / f"rng.rank{rank:03d}.pt", weights_only=True))
    return int(state["step"])


# Run files: config.json and metrics.jsonl (rank 0 only).
def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the resumed step (written by the interrupted run after its last save)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


def log_metrics(out: Path, is_main: bool, record: dict) -> None:
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


# Final outputs (every rank calls these).
def write_outputs(out, method, merge, model, base_params, ckpt_dir, tokenizer_path, config, dp_rank,
                  fsdp: bool) -> dict:
    """adapter/ (LoRA), merged/ (LoRA + --merge) or model/ (full): Meta layout, one shard per model-parallel rank.
    Every rank calls this (save_adapter is collective); data-parallel replicas hold equal weights, so only the
    first model-parallel group gathers and writes the Meta folders (under FSDP each of its tensors is first
    all-gathered over the data-parallel group, one at a time)."""
    outputs = {}
    if method in ("lora", "qlora"):
        from kollama import lora as L

        extra = {k: config[k] for k in ("template", "cutoff_len", "train_on_inputs", "total_steps", "seed")}
        if method == "qlora":  # the adapter was trained against NF4(base): load it onto a quantized base
            extra["base_quantization"] = "nf4"
        L.save_adapter(model, out / "adapter", {"base_model": str(ckpt_dir), "tokenizer": str(tokenizer_path), **extra})
        outputs["adapter"] = str(out / "adapter")
        if merge and method == "qlora":
            from kollama import qlora as Q

            write_meta(out / "merged", Q.merged_dense_state(model), base_params, tokenizer_path, dp_rank)
            outputs["merged"] = str(out / "merged")
        elif merge:
            L.merge_lora(model)
            write_meta(out / "merged", L.base_state_dict(model), base_params, tokenizer_path, dp_rank)
            outputs["merged"] = str(out / "merged")
    else:
        if fsdp:
            from kollama.fsdp import gather_full_state

            state = gather_full_state(model, keep=dp_rank == 0)
        else:
            state = model.state_dict()
        write_meta(out / "model", state, base_params, tokenizer_path, dp_rank)
        outputs["model"] = str(out / "model")
    return outputs


def write_meta(dst: Path, local_state: dict, params: dict, tokenizer_path: str, dp_rank: int) -> None:
    """Gather every model-parallel rank's shard on the group's first rank and write them as consolidated.NN."""
    if dp_rank == 0:
        local = {k: v.detach().to("cpu") for k, v in local_state.items()}
        group = get_model_parallel_group()
        if group is None:
            shards = [local]
        else:
            shards = [None] * get_model_parallel_world_size() if get_model_parallel_rank() == 0 else None
            dist.gather_object(local, shards, dst=get_model_parallel_src_rank(), group=group)
        if get_model_parallel_rank() == 0:
            write_checkpoint(dst, params, (iter(s.items()) for s in shards), overwrite=True,
                             extra_files=[Path(tokenizer_path)])
    if dist.is_initialized():
        dist.barrier()
