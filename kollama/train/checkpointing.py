"""Trainer state for exact resume (``out_dir/checkpoints/step-NNNNNN/``) and the run's final outputs (``adapter/``,
``merged/``, ``model/``). The run's config.json / metrics.jsonl are ``kollama.train.run_folder.RunLog``'s.

Files: ``weights.mpRR.safetensors`` (this model-parallel rank's trainable tensors, by parameter name),
``optimizer.mpRR.pt``, ``rng.rankGGG.pt`` (torch CPU/CUDA and Python RNG of every global rank),
``trainer_state.json`` ({"step", "config", **extra_state}) and ``manifest.json`` (size and sha256 of every other file,
the config hash, the base model's and tokenizer's fingerprints). Data-parallel replicas hold equal weights and
optimizer state, so only data-parallel rank 0 of each model-parallel slot writes those. Under ``--fsdp`` no two ranks
hold the same shard: every rank writes its own ``weights.mpRR.dpDD.safetensors`` and ``optimizer.mpRR.dpDD.pt``
(plain local tensors), and resuming needs the same world. There is no scheduler file: the trainer sets the learning
rate from the step (a ``scheduler.pt`` in an older checkpoint is ignored).

A save never loses a run: every file is written under a temporary name, fsynced and renamed (``atomic_write``) into
``.step-NNNNNN.tmp``; after all ranks have written, rank 0 writes ``manifest.json`` last, fsyncs the folder, renames
it to ``step-NNNNNN`` and fsyncs the parent. A folder under the final name with a manifest is therefore complete
(the ranks must share the file system, as on one node). A failed write on any rank (disk full) is shared with all
ranks, the temporary folder removed, and every rank raises ``CheckpointSaveError``; older checkpoints are untouched.
Resume (``find_resumable``) takes the newest checkpoint whose files match its manifest on every rank and reports
the damaged newer ones, which are kept on disk. Rotation deletes only intact ``step-NNNNNN`` folders.

Functions marked *collective* must be called by every rank under torch.distributed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from kollama.train.distributed import local
from llama.errors import UserError
from llama.files import atomic_write, fsync_dir, replace_folder, sha256_file, write_json
from llama.checkpoint import write_checkpoint
from llama.parallel import (get_model_parallel_group, get_model_parallel_rank, get_model_parallel_src_rank,
                            get_model_parallel_world_size)

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
STATE = "trainer_state.json"
_STEP_RE = re.compile(r"^step-(\d+)$")
_LEFTOVER_RE = re.compile(r"^\.step-\d+\.tmp$")


class TrainingDiverged(UserError, RuntimeError):
    """The loss or gradient norm became NaN/inf; nothing was updated and the last checkpoint is intact."""


class CheckpointSaveError(UserError, OSError):
    """A checkpoint could not be written (disk full, I/O error) on some rank. An OSError, so code that handles I/O
    failures sees it; ``errno`` is the failing call's errno when known. Every rank raises the same one-line message;
    the partial folder is removed and earlier checkpoints are intact."""

    def __init__(self, message: str, code: Optional[int] = None):
        super().__init__(message)  # one argument: str(e) is the message itself
        self.errno = code


# ---------------------------------------------------------------------------------------------------------------
# Durable files
# ---------------------------------------------------------------------------------------------------------------
def _torch_save(obj, path) -> Path:
    # Through a Python file object, so a full disk raises OSError(ENOSPC) rather than torch's RuntimeError.
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    return atomic_write(path, write)


def _safetensors_save(tensors: Dict[str, torch.Tensor], path) -> Path:
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


def file_digest(path) -> dict:
    """{"size", "sha256"} of a file as read back from the file system."""
    return {"size": os.path.getsize(path), "sha256": sha256_file(path)}


def config_hash(config: dict) -> str:
    """sha256 of the canonical JSON of ``config``: sorted keys, separators (",", ":"), UTF-8, non-JSON values as
    str (the same rule trainer_state.json uses)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Collectives (identity in a single process)
# ---------------------------------------------------------------------------------------------------------------
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_gather(obj) -> list:
    # Object collectives pick the right device for the backend (gloo: CPU, NCCL: the current GPU).
    if not _distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _from_rank0(obj):
    """Rank 0's ``obj`` on every rank (also a barrier)."""
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------------------------
def step_dir(root, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def _shard_suffix(mp_rank: int, dp_rank: int, fsdp: bool) -> str:
    return f"mp{mp_rank:02d}.dp{dp_rank:02d}" if fsdp else f"mp{mp_rank:02d}"


def files_to_read(rank: int, mp_rank: int, dp_rank: int = 0, fsdp: bool = False) -> List[str]:
    """The files ``load_trainer_state`` reads on this rank: ``names_for_this_rank`` of ``find_resumable``."""
    suffix = _shard_suffix(mp_rank, dp_rank, fsdp)
    return [STATE, f"weights.{suffix}.safetensors", f"optimizer.{suffix}.pt", f"rng.rank{rank:03d}.pt"]


def _step_folders(root) -> List[Tuple[int, Path]]:
    """``(step, path)`` of every ``step-NNNNNN`` folder under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir())


def latest_checkpoint(root) -> Optional[Path]:
    """The newest ``step-NNNNNN`` folder with a trainer_state.json (unverified; see ``find_resumable``)."""
    found = [p for _, p in _step_folders(root) if (p / STATE).is_file()]
    return found[-1] if found else None


# ---------------------------------------------------------------------------------------------------------------
# Verification and resume
# ---------------------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> Tuple[Optional[dict], Optional[str]]:
    try:
        return json.loads(path.read_bytes()), None
    except FileNotFoundError:
        return None, f"missing {path.name}"
    except (OSError, ValueError) as e:
        return None, f"{path.name} is not readable JSON ({_one_line(e)})"


def _verify_legacy(path: Path, names: Optional[Iterable[str]]) -> Optional[str]:
    """A checkpoint written before manifests: its trainer_state.json parses and the named files exist."""
    _, reason = _read_json(path / STATE)
    if reason:
        return reason
    for name in names or ():
        if not (path / name).is_file():
            return f"missing {name}"
    log.warning("%s was written before manifests; not verified", path)
    return None


def _verify_file(path: Path, name: str, expected: dict) -> Optional[str]:
    file = path / name
    if not file.is_file():
        return f"missing {name}"
    try:  # an unreadable file is a reason, not an exception: the other ranks wait for this answer
        size = file.stat().st_size
        if size != expected.get("size"):
            return f"{name} is {size} bytes, the manifest says {expected.get('size')}"
        if file_digest(file)["sha256"] != expected.get("sha256"):
            return f"{name} sha256 mismatch (the file changed after it was saved)"
    except OSError as e:
        return f"{name} is unreadable ({_one_line(e)})"
    return None


def verify_checkpoint(path, names: Optional[Iterable[str]] = None) -> Optional[str]:
    """None when the checkpoint at ``path`` is intact, else a one-line reason. ``names``: the files to check (those
    this rank will read); None = every file in the manifest. Local (not collective)."""
    path = Path(path)
    if not path.is_dir():
        return "not a folder"
    if not (path / MANIFEST).exists() and (path / STATE).is_file():
        return _verify_legacy(path, names)
    manifest, reason = _read_json(path / MANIFEST)
    if reason:
        return reason
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"),
                                                                                             dict):
        return f"{MANIFEST} is not a format-{FORMAT} manifest"
    m = _STEP_RE.match(path.name)
    if m and manifest.get("step") != int(m.group(1)):
        return f"{MANIFEST} is for step {manifest.get('step')}, not {int(m.group(1))}"
    files = manifest["files"]
    for name in (files if names is None else names):
        if name not in files:
            return f"{name} is not in this checkpoint (saved with another world size or parallel layout?)"
        reason = _verify_file(path, name, files[name])
        if reason:
            return reason
    return None


def _agree(path: Path, names: Optional[Sequence[str]]) -> Optional[str]:
    """*Collective*: this checkpoint's reason as seen by all ranks together (None only if every rank's files are
    intact). Each rank checks only the files it will read."""
    reasons = _all_gather(verify_checkpoint(path, names))
    for r, reason in enumerate(reasons):
        if reason is not None:
            return reason if len(reasons) == 1 else f"{reason} (rank {r})"
    return None


def find_resumable(root, names_for_this_rank: Optional[Sequence[str]] = None
                   ) -> Tuple[Optional[Path], List[Tuple[Path, str]]]:
    """*Collective.* The newest intact checkpoint under ``root`` (None if none) and the damaged newer ones with
    their reasons (for the caller to report; they are skipped, never deleted). ``names_for_this_rank``: see
    ``files_to_read``; None = every file in each manifest. All ranks return the same answer."""
    candidates = _from_rank0([p for _, p in reversed(_step_folders(root))])  # one list for every rank
    damaged = []
    for path in candidates:
        reason = _agree(Path(path), names_for_this_rank)
        if reason is None:
            return Path(path), damaged
        damaged.append((Path(path), reason))
    return None, damaged


def _newest_intact(root) -> Optional[Path]:
    """Rank-local: the newest checkpoint that verifies in full (for messages)."""
    for _, path in reversed(_step_folders(root)):
        if verify_checkpoint(path) is None:
            return path
    return None


# ---------------------------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------------------------
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


def _one_line(e: BaseException) -> str:
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return " ".join(str(text).split()) or type(e).__name__


def _rank_writers(step, named, optimizer, config, rank, mp_rank, dp_rank, fsdp, extra_state) -> list:
    """``(file name, write(path))`` for the files this rank saves; built lazily so a failure names its file."""
    writers = []
    if dp_rank == 0 or fsdp:  # replicas hold equal weights and optimizer state: their dp-rank-0 peer writes them
        suffix = _shard_suffix(mp_rank, dp_rank, fsdp)

        def weights(p):
            _safetensors_save({n: local(t).detach().to("cpu").contiguous() for n, t in named}, p)

        def optim(p):
            state = optimizer.state_dict()
            if fsdp:
                from kollama.train.fsdp import local_optimizer_state

                state = local_optimizer_state(state)
            _torch_save(state, p)
        writers += [(f"weights.{suffix}.safetensors", weights), (f"optimizer.{suffix}.pt", optim)]
    writers.append((f"rng.rank{rank:03d}.pt", lambda p: _torch_save(_rng_state(), p)))
    if rank == 0:
        writers.append((STATE, lambda p: write_json(p, {"step": step, "config": config, **extra_state})))
    return writers


def _write_rank_files(tmp: Path, writers: list, rank: int) -> Tuple[dict, Optional[tuple]]:
    """Run this rank's writers; ({name: digest}, None) or (partial, (file, message, errno)) on the first failure.
    Any exception counts: safetensors reports a full disk as its own error type, and one rank raising alone
    would leave the others waiting in the next collective."""
    digests = {}
    for name, write in writers:
        try:
            write(tmp / name)
            digests[name] = file_digest(tmp / name)  # read back after fsync
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            log.debug("rank %d: writing %s failed", rank, name, exc_info=True)
            return digests, (f"{name} (rank {rank})", _one_line(e), getattr(e, "errno", None))
    return digests, None


def _manifest(step: int, files: dict, config: dict, extra_state: dict) -> dict:
    return {"format": FORMAT, "step": step, "files": dict(sorted(files.items())), "config_hash": config_hash(config),
            "base": extra_state.get("base"), "tokenizer_sha256": extra_state.get("tokenizer_sha256")}


def _publish(tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` to ``final``; an existing ``final`` (the same step saved again) is replaced only
    now, and put back if the rename fails."""
    replace_folder(tmp, final)


def _remove_leftovers(root: Path) -> None:
    """``.step-*.tmp`` folders of a save that crashed: never a checkpoint."""
    for p in root.iterdir():
        if _LEFTOVER_RE.match(p.name) and p.is_dir():
            log.warning("removing %s left by an interrupted save", p)
            shutil.rmtree(p, ignore_errors=True)


def rotate(root, keep: Optional[int], protect: Iterable = (), just_written: Optional[Path] = None) -> List[Path]:
    """Delete intact ``step-NNNNNN`` folders beyond the ``keep`` newest intact ones, except ``protect`` and
    ``just_written``; damaged ones are logged and kept. Returns the deleted paths. Rank 0 only (rank-local)."""
    if not keep or keep <= 0:
        return []
    spared = {Path(p).resolve() for p in protect} | ({Path(just_written).resolve()} if just_written else set())
    kept, deleted = 0, []
    for _, path in reversed(_step_folders(root)):
        reason = None if just_written is not None and path == Path(just_written) else verify_checkpoint(path)
        if reason is not None:
            log.warning("keeping damaged checkpoint %s (%s)", path, reason)
        elif kept < keep:
            kept += 1
        elif path.resolve() not in spared:
            shutil.rmtree(path, onerror=lambda f, p, e: log.warning("rotation: could not delete %s: %s", p, e[1]))
            deleted.append(path)
    return deleted


def _failure_message(step: int, failure: tuple, root: Path, final: Path) -> str:
    name, message, _ = failure
    newest = _newest_intact(root)
    same = ", the previous copy of this step" if newest == final else ""
    earlier = (f"earlier checkpoints are intact (newest: {newest}{same})" if newest is not None
               else "no earlier intact checkpoint exists")
    return f"checkpoint step {step} was not saved: writing {name} failed: {message}; {earlier}"


def save_trainer_state(root, step: int, model, named, optimizer, config: dict, rank: int, mp_rank: int,
                       dp_rank: int, keep: Optional[int] = 2, fsdp: bool = False, protect: Iterable = (),
                       extra_state: Optional[dict] = None) -> Path:
    """*Collective.* Save ``root/step-NNNNNN`` (see the module docstring) and rotate older checkpoints; returns its
    path. ``named``: (name, parameter) of the trainable parameters; ``extra_state``: more keys for
    trainer_state.json (its ``base`` and ``tokenizer_sha256`` also go into the manifest); ``protect``: checkpoint
    paths rotation must keep (the one resumed from); ``keep`` 0/None keeps all. Raises ``CheckpointSaveError`` on
    every rank if any rank fails to write."""
    del model  # the trainable tensors come from ``named``; kept in the signature for the trainer's call
    extra_state = dict(extra_state or {})
    if {"step", "config"} & extra_state.keys():
        raise ValueError("extra_state must not set 'step' or 'config'")
    root, named = Path(root), list(named)
    final, tmp = step_dir(root, step), root / f".step-{step:06d}.tmp"

    failure = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            _remove_leftovers(root)
            tmp.mkdir()
        except OSError as e:
            failure = (f"{tmp.name} (rank 0)", _one_line(e), e.errno)
    failure = _from_rank0(failure)

    digests = {}
    if failure is None:
        writers = _rank_writers(step, named, optimizer, config, rank, mp_rank, dp_rank, fsdp, extra_state)
        digests, failure = _write_rank_files(tmp, writers, rank)
    gathered = _all_gather((digests, failure))  # every rank learns of any rank's failure: nobody waits alone
    failure = next((f for _, f in gathered if f is not None), None)

    outcome = None  # rank 0's verdict, shared below: None or (message, errno)
    if rank == 0:
        outcome = _finish(root, step, tmp, final, gathered, failure, config, extra_state, keep, protect)
    outcome = _from_rank0(outcome)
    if outcome is not None:
        raise CheckpointSaveError(*outcome)
    return final


def _finish(root, step, tmp, final, gathered, failure, config, extra_state, keep, protect) -> Optional[tuple]:
    """Rank 0: write the manifest and publish the folder, or clean up after a failure; then rotate."""
    if failure is None:
        files = {name: d for digests, _ in gathered for name, d in digests.items()}
        try:
            write_json(tmp / MANIFEST, _manifest(step, files, config, extra_state))  # last: marks it complete
            _publish(tmp, final)
        except Exception as e:  # noqa: BLE001 - the other ranks wait for this verdict, so never raise here
            name = f"{final.name} (rename)" if (tmp / MANIFEST).exists() else MANIFEST
            failure = (f"{name} (rank 0)", _one_line(e), getattr(e, "errno", None))
    if failure is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        message = _failure_message(step, failure, root, final)
        log.error(message)
        return message, failure[2]
    try:
        for path in rotate(root, keep, protect, just_written=final):
            log.info("rotation: deleted %s", path)
    except OSError as e:  # the new checkpoint is in place; a failed cleanup must not fail the save
        log.warning("rotation under %s failed: %s", root, _one_line(e))
    return None


# ---------------------------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------------------------
def _need(path: Path, name: str) -> Path:
    file = path / name
    if not file.is_file():
        raise FileNotFoundError(f"{path}: missing {name} (was it saved with another world size or parallel "
                                f"layout?)")
    return file


def _load_weights(path: Path, named, suffix: str) -> None:
    tensors = load_file(str(_need(path, f"weights.{suffix}.safetensors")))
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


def _load_optimizer(path: Path, optimizer, suffix: str, fsdp: bool) -> None:
    state = torch.load(_need(path, f"optimizer.{suffix}.pt"), map_location="cpu", weights_only=True)
    if fsdp:
        from kollama.train.fsdp import sharded_optimizer_state

        state = sharded_optimizer_state(state, optimizer)
    optimizer.load_state_dict(state)


def load_trainer_state(path, model, named, optimizer, rank: int, mp_rank: int, dp_rank: int = 0,
                       fsdp: bool = False) -> dict:
    """Restore the trainable weights, the optimizer state and this rank's RNG from ``path``; returns the parsed
    trainer_state.json ({"step", "config", ...extra_state}) for the caller to compare. Local (not collective)."""
    del model
    path = Path(path)
    if not (path / STATE).is_file():
        raise FileNotFoundError(f"{path} is not a trainer checkpoint (no {STATE}); pass a checkpoints/step-NNNNNN "
                                f"folder or --resume True")
    state = json.loads((path / STATE).read_text())
    named = list(named)
    suffix = _shard_suffix(mp_rank, dp_rank, fsdp)
    _load_weights(path, named, suffix)
    _load_optimizer(path, optimizer, suffix, fsdp)
    _set_rng_state(torch.load(_need(path, f"rng.rank{rank:03d}.pt"), weights_only=True))
    return state


# ---------------------------------------------------------------------------------------------------------------
# Divergence
# ---------------------------------------------------------------------------------------------------------------
def quarantine_checkpoint(root, step: int) -> Optional[Path]:
    """*Collective.* Rank 0 renames ``step-NNNNNN`` to ``diverged-step-NNNNNN`` (``-2``, ``-3``... if taken) so
    neither resume nor rotation sees it; nothing is deleted. Every rank returns the new path (None if there was no
    such folder), after the rename (a barrier)."""
    main = not _distributed() or dist.get_rank() == 0
    return _from_rank0(_rename_aside(root, step) if main else None)


def _rename_aside(root, step: int) -> Optional[Path]:
    src = step_dir(root, step)
    if not src.is_dir():
        return None
    new, n = src.with_name(f"diverged-{src.name}"), 1
    while new.exists():
        n += 1
        new = src.with_name(f"diverged-{src.name}-{n}")
    src.rename(new)
    fsync_dir(src.parent)
    log.warning("quarantined %s as %s", src, new)
    return new


# ---------------------------------------------------------------------------------------------------------------
# Final outputs (every rank calls these)
# ---------------------------------------------------------------------------------------------------------------
def write_outputs(out, method, merge, model, base_params, ckpt_dir, tokenizer_path, config, dp_rank,
                  fsdp: bool) -> dict:
    """adapter/ (LoRA), merged/ (LoRA + --merge) or model/ (full): Meta layout, one shard per model-parallel rank.
    Every rank calls this (save_adapter is collective); data-parallel replicas hold equal weights, so only the
    first model-parallel group gathers and writes the Meta folders (under FSDP each of its tensors is first
    all-gathered over the data-parallel group, one at a time)."""
    outputs = {}
    if method in ("lora", "qlora"):
        from kollama.adapters import fingerprint as FP
        from kollama.adapters import lora as L

        extra = {k: config[k] for k in ("template", "cutoff_len", "train_on_inputs", "total_steps", "seed")}
        # What the adapter belongs to; kollama.adapters.adapter.apply_adapter refuses another base or tokenizer.
        extra.update(base=FP.base_fingerprint(ckpt_dir), tokenizer_sha256=FP.tokenizer_sha256(tokenizer_path))
        if method == "qlora":  # the adapter was trained against NF4(base): load it onto a quantized base
            extra["base_quantization"] = "nf4"
        L.save_adapter(model, out / "adapter", {"base_model": str(ckpt_dir), "tokenizer": str(tokenizer_path), **extra})
        outputs["adapter"] = str(out / "adapter")
        if merge and method == "qlora":
            from kollama.adapters import qlora as Q

            write_meta(out / "merged", Q.merged_dense_state(model), base_params, tokenizer_path, dp_rank)
            outputs["merged"] = str(out / "merged")
        elif merge:
            L.merge_lora(model)
            write_meta(out / "merged", L.base_state_dict(model), base_params, tokenizer_path, dp_rank)
            outputs["merged"] = str(out / "merged")
    else:
        if fsdp:
            from kollama.train.fsdp import gather_full_state

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
