"""Meta-layout checkpoints: ``params.json`` + ``consolidated.NN.{pth,safetensors}``, any shard count on any world size.

Shards split a tensor along the dim given by ``llama.parallel.shard_dim_of`` (0 for wq/wk/wv/w1/w3/output, 1 for
wo/w2/tok_embeddings, norms replicated). A rank of a world of size W needs the slice ``[r*G/W, (r+1)*G/W)`` of
the global tensor; it is cut out of whichever of the N shards overlap it, so N and W need only both divide G.
Shards are opened lazily (``torch.load(mmap=True)``, ``safe_open``), so only the bytes a rank needs are read.

Writing goes to a temporary folder beside the destination that is renamed into place at the end: an
interrupted write never leaves a half checkpoint under the destination name.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llama.errors import UserError
from llama.model import ModelArgs
from llama.parallel import shard_dim_of

PARAMS_FILE = "params.json"
IGNORED_KEYS = {"rope.freqs"}  # Meta files carry the rotary table; it is recomputed, not a parameter
_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.(pth|safetensors)$")


class CheckpointError(UserError):
    """A checkpoint that cannot be used as it is; the message says what is wrong and what to do."""


# ---------------------------------------------------------------------------------------------------------------
# params.json
# ---------------------------------------------------------------------------------------------------------------
def read_params(ckpt_dir) -> dict:
    path = Path(ckpt_dir) / PARAMS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; a Meta checkpoint folder holds params.json next to its shards")
    try:
        params = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); restore it from the original download") from e
    if not isinstance(params, dict):
        raise CheckpointError(f"{path} must hold a JSON object of model arguments, got {type(params).__name__}")
    unknown = sorted(set(params) - ModelArgs.field_names())
    if unknown:
        raise CheckpointError(
            f"{path} has unknown keys {unknown}; known keys are {sorted(ModelArgs.field_names())}"
        )
    for key in ("dim", "n_layers", "n_heads"):
        if key not in params:
            raise CheckpointError(f"{path} lacks the required key {key!r}")
    return params


# ---------------------------------------------------------------------------------------------------------------
# Reading shards
# ---------------------------------------------------------------------------------------------------------------
def list_shards(ckpt_dir) -> List[Path]:
    """consolidated.NN.* files in order; refuses a mix of formats or a gap in the numbering."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint folder {str(ckpt_dir)!r} does not exist; pass --ckpt_dir of a model folder")
    found = sorted((int(m.group(1)), m.group(2), p) for p in ckpt_dir.iterdir() if (m := _SHARD_RE.match(p.name)))
    if not found:
        raise CheckpointError(
            f"no consolidated.NN.pth or consolidated.NN.safetensors in {ckpt_dir}; "
            f"point --ckpt_dir at the folder holding the model shards (e.g. llama-2-7b/)"
        )
    formats = {fmt for _, fmt, _ in found}
    if len(formats) > 1:
        raise CheckpointError(f"{ckpt_dir} mixes .pth and .safetensors shards; keep one format")
    numbers = [n for n, _, _ in found]
    if numbers != list(range(len(found))):
        raise CheckpointError(f"shard numbers in {ckpt_dir} are {numbers}; expected 0..{len(found) - 1} with no gap")
    return [p for _, _, p in found]


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):  # files from torch < 1.6 (legacy format) cannot be memory-mapped
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


class ShardReader:
    """Lazy access to one shard's tensors by name."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if self.path.suffix == ".safetensors":
            try:
                self._st = safe_open(str(self.path), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"cannot read {self.path} as safetensors ({e}); the file may be truncated") from e
            self._keys = list(self._st.keys())
        else:
            self._st = None
            try:
                sd = _torch_load(self.path)
            except pickle.UnpicklingError as e:
                raise CheckpointError(
                    f"refused to load {self.path}: it is not a plain tensor checkpoint (weights_only=True rejects "
                    f"pickled code). Only load checkpoints from sources you trust, converted to tensors only. ({e})"
                ) from e
            except (RuntimeError, EOFError, OSError) as e:
                raise CheckpointError(
                    f"cannot read {self.path} ({e}); the file may be truncated or an error page saved as .pth: "
                    f"download it again and check it against checklist.chk"
                ) from e
            if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                raise CheckpointError(f"{self.path} does not hold a flat name -> tensor state_dict")
            self._sd = sd
            self._keys = list(sd)

    def keys(self) -> List[str]:
        return [k for k in self._keys if k not in IGNORED_KEYS]

    def get(self, name: str) -> torch.Tensor:
        return self._st.get_tensor(name) if self._st is not None else self._sd[name]

    def get_slice(self, name: str, dim: int, start: int, length: int) -> torch.Tensor:
        """``get(name).narrow(dim, start, length)`` without reading the rest of a safetensors tensor."""
        if self._st is not None:
            sl = self._st.get_slice(name)
            index = [slice(None)] * len(sl.get_shape())
            index[dim] = slice(start, start + length)
            return sl[tuple(index)]
        return self._sd[name].narrow(dim, start, length)

    def shape(self, name: str) -> Tuple[int, ...]:
        if self._st is not None:
            return tuple(self._st.get_slice(name).get_shape())
        return tuple(self._sd[name].shape)


def open_shards(ckpt_dir) -> List[ShardReader]:
    readers = [ShardReader(p) for p in list_shards(ckpt_dir)]
    keys = set(readers[0].keys())
    for r in readers[1:]:
        if set(r.keys()) != keys:
            missing = sorted(keys ^ set(r.keys()))[:5]
            raise CheckpointError(f"{r.path.name} and {readers[0].path.name} hold different tensors (e.g. {missing})")
    return readers


def global_shape(readers: List[ShardReader], name: str) -> Tuple[int, ...]:
    shape = list(readers[0].shape(name))
    dim = shard_dim_of(name)
    if dim is not None:
        shape[dim] *= len(readers)
    return tuple(shape)


def read_slice(readers: List[ShardReader], name: str, rank: int, world_size: int) -> torch.Tensor:
    """This rank's slice of tensor ``name`` for a world of ``world_size``, from N shards of any count."""
    dim = shard_dim_of(name)
    if dim is None:
        return readers[0].get(name)
    shard_len = readers[0].shape(name)[dim]
    total = shard_len * len(readers)
    if total % world_size != 0:
        raise CheckpointError(
            f"{name} has {total} rows along dim {dim}, which cannot be split over {world_size} processes; "
            f"use a model parallel size that divides {total}"
        )
    start, stop = rank * total // world_size, (rank + 1) * total // world_size
    if len(readers) == world_size:
        return readers[rank].get(name)
    pieces = []
    for i, reader in enumerate(readers):
        lo, hi = max(start, i * shard_len), min(stop, (i + 1) * shard_len)
        if lo < hi:
            pieces.append(reader.get_slice(name, dim, lo - i * shard_len, hi - lo))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def load_local_state_dict(ckpt_dir, expected: Dict[str, torch.Tensor], rank: int, world_size: int,
                          readers: Optional[List[ShardReader]] = None) -> Dict[str, torch.Tensor]:
    """The state_dict of one model-parallel rank, checked key by key against ``expected`` (a local model's
    state_dict, e.g. on the meta device): every key present, no extra keys, every shape equal."""
    readers = readers if readers is not None else open_shards(ckpt_dir)
    keys = set(readers[0].keys())
    missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} does not match params.json: missing {missing[:5]}{'...' if len(missing) > 5 else ''}"
            f", unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    state = {}
    for name, ref in expected.items():
        tensor = read_slice(readers, name, rank, world_size)
        if tuple(tensor.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{name}: the checkpoint's shards give shape {tuple(global_shape(readers, name))} "
                f"(this rank's slice {tuple(tensor.shape)}) but params.json implies {tuple(ref.shape)} per rank; "
                f"params.json and the shards disagree"
            )
        state[name] = tensor
    return state


# ---------------------------------------------------------------------------------------------------------------
# Splitting and writing
# ---------------------------------------------------------------------------------------------------------------
def split_tensor(name: str, tensor: torch.Tensor, n: int) -> List[torch.Tensor]:
    """The n shards of a full tensor (replicated tensors are repeated)."""
    dim = shard_dim_of(name)
    if dim is None:
        return [tensor] * n
    if tensor.shape[dim] % n != 0:
        raise CheckpointError(f"{name} has {tensor.shape[dim]} rows along dim {dim}, not divisible into {n} shards")
    return [t.contiguous() for t in tensor.chunk(n, dim=dim)]


def check_model_parallel_size(params: dict, n: int) -> None:
    """Refuse a shard count that does not divide the heads (each shard must hold whole heads)."""
    n_heads = params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    if n < 1 or n_heads % n or n_kv % n:
        raise CheckpointError(
            f"{n} shards cannot split {n_heads} attention heads and {n_kv} kv heads evenly; "
            f"choose a shard count that divides {n_kv}"
        )


def md5sum(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def prepare_destination(dst, overwrite: bool) -> Path:
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise CheckpointError(f"destination {dst} exists and is not empty; choose another folder or pass --overwrite")
    dst.parent.mkdir(parents=True, exist_ok=True)
    return dst


def commit_folder(tmp: Path, dst: Path) -> None:
    """Move a finished temporary folder to ``dst``; an old ``dst`` is removed only after the new one is complete."""
    old = None
    if dst.exists():
        old = dst.with_name(dst.name + f".old-{os.getpid()}")
        dst.rename(old)
    tmp.rename(dst)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def write_checkpoint(dst, params: dict, shards: Iterable[Iterator[Tuple[str, torch.Tensor]]], *,
                     fmt: str = "safetensors", overwrite: bool = False, extra_files: Iterable[Path] = ()) -> Path:
    """Write a Meta-layout folder: params.json, consolidated.NN.<fmt> (one per item of ``shards``, each an
    iterator of (name, tensor)), copies of ``extra_files`` (e.g. tokenizer.model) and checklist.chk."""
    if fmt not in ("safetensors", "pth"):
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; use 'safetensors' or 'pth'")
    dst = prepare_destination(dst, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        (tmp / PARAMS_FILE).write_text(json.dumps(params, indent=2) + "\n")
        for i, tensors in enumerate(shards):
            state = {name: t.contiguous() for name, t in tensors}
            path = tmp / f"consolidated.{i:02d}.{fmt}"
            if fmt == "safetensors":
                save_file(state, str(path), metadata={"format": "pt"})
            else:
                torch.save(state, path)
            del state
        for extra in extra_files:
            shutil.copyfile(extra, tmp / Path(extra).name)
        names = sorted(p.name for p in tmp.iterdir())
        (tmp / "checklist.chk").write_text("".join(f"{md5sum(tmp / n)}  {n}\n" for n in names))
        commit_folder(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def reshard(src, dst, mp: int, *, fmt: Optional[str] = None, overwrite: bool = False) -> Path:
    """Rewrite a Meta checkpoint with any shard count as ``mp`` shards, one output shard in memory at a time."""
    params = read_params(src)
    check_model_parallel_size(params, mp)
    readers = open_shards(src)
    fmt = fmt or ("safetensors" if readers[0].path.suffix == ".safetensors" else "pth")
    extras = [p for p in Path(src).iterdir() if p.name == "tokenizer.model"]

    def shard(rank):
        for name in readers[0].keys():
            yield name, read_slice(readers, name, rank, mp)

    return write_checkpoint(dst, params, (shard(r) for r in range(mp)), fmt=fmt, overwrite=overwrite,
                            extra_files=extras)


# ---------------------------------------------------------------------------------------------------------------
# The object Llama.build loads from. Other layouts (HF) provide the same three members.
# ---------------------------------------------------------------------------------------------------------------
class MetaCheckpoint:
    """A Meta-layout folder: ``params`` (dict), ``vocab_size``, ``local_state_dict(expected, rank, world_size)``."""

    def __init__(self, ckpt_dir):
        self.ckpt_dir = Path(ckpt_dir)
        self.params = read_params(ckpt_dir)
        self.readers = open_shards(ckpt_dir)
        if "tok_embeddings.weight" not in self.readers[0].keys():
            raise CheckpointError(f"{self.readers[0].path} has no tok_embeddings.weight; is it a Llama checkpoint?")
        self.vocab_size = global_shape(self.readers, "tok_embeddings.weight")[0]
        declared = self.params.get("vocab_size", -1)
        if declared not in (-1, None) and declared != self.vocab_size:
            raise CheckpointError(
                f"params.json says vocab_size={declared} but the shards hold {self.vocab_size} embedding rows"
            )

    def local_state_dict(self, expected: Dict[str, torch.Tensor], rank: int, world_size: int):
        return load_local_state_dict(self.ckpt_dir, expected, rank, world_size, self.readers)


def open_checkpoint(ckpt_dir):
    """Open a checkpoint folder, whatever its layout: Meta (params.json / consolidated.NN.*) -> MetaCheckpoint,
    Hugging Face (config.json + model.safetensors or its index) -> ``llama.hf.HFCheckpoint``."""
    path = Path(ckpt_dir)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {str(path)!r} does not exist; pass --ckpt_dir of a model folder")
    names = sorted(p.name for p in path.iterdir())
    if PARAMS_FILE in names or any(_SHARD_RE.match(n) for n in names):
        return MetaCheckpoint(path)
    if "config.json" in names:
        from llama.hf import HFCheckpoint  # imported here: llama.hf builds on this module

        return HFCheckpoint(path)
    raise CheckpointError(
        f"{path} is not a checkpoint folder: found {names[:10]}{'...' if len(names) > 10 else ''}; expected "
        f"params.json with consolidated.NN.pth/.safetensors (Meta) or config.json with model.safetensors or "
        f"model.safetensors.index.json (Hugging Face)"
    )
