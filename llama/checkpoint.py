"""Meta-layout checkpoints: ``params.json`` + ``consolidated.NN.{pth,safetensors}``, any shard count on any world size.

Shards split a tensor along the dim given by ``llama.parallel.shard_dim_of`` (0 for wq/wk/wv/w1/w3/output, 1 for
wo/w2/tok_embeddings, norms replicated). A rank of a world of size W needs the slice ``[r*G/W, (r+1)*G/W)`` of
the global tensor; it is cut out of whichever of the N shards overlap it, so N and W need only both divide G.
Shards are opened lazily (``torch.load(mmap=True)``, ``safe_open``), so only the bytes a rank needs are read.

Writing goes to a temporary folder beside the destination that is renamed into place at the end (``staged_folder``):
an interrupted write never leaves a half checkpoint under the destination name, and a destination that is, holds or
lies inside the source is refused, so a conversion never changes what it reads.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickle
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llama.errors import UserError
from llama.files import fsync_file, replace_folder
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
    return check_params(params, path)


_WHOLE_SIZES = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_batch_size",
                "max_seq_len", "hidden_dim")  # hidden_dim: the FFN width, config.json's intermediate_size
_POSITIVE_NUMBERS = ("ffn_dim_multiplier", "norm_eps", "rope_theta")
_NULLABLE = {"n_kv_heads", "ffn_dim_multiplier"}  # null means "same as n_heads" / "no multiplier"


def _whole(value) -> Optional[int]:
    """``value`` as an int if it is a whole number (32 or 32.0, not True, "32" or 32.5), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def check_params(params: dict, path, names: Optional[Dict[str, str]] = None) -> dict:
    """``params`` (Meta's names) checked before any tensor is read, with whole floats (32.0) made ints: sizes are
    positive whole numbers (vocab_size may be -1: the tokenizer decides), eps/theta/multiplier positive numbers,
    n_heads divides dim into an even head size (rotary pairs), n_kv_heads divides n_heads. An error names ``path``
    and the field as that file spells it (``names`` maps Meta's name to it, e.g. dim -> hidden_size)."""
    names = names or {}
    out = dict(params)

    def refuse(key, expected):
        try:
            shown = json.dumps(params[key])
        except (TypeError, ValueError):
            shown = repr(params[key])
        raise CheckpointError(f"{path}: {names.get(key, key)} is {shown}, expected {expected}; correct the file "
                              f"(or download it again)")

    for key, value in params.items():
        if value is None and key in _NULLABLE:
            continue
        if key in _WHOLE_SIZES:
            whole = _whole(value)
            if whole is None or not (whole > 0 or (key == "vocab_size" and whole == -1)):
                refuse(key, "a positive whole number" + (" (or -1)" if key == "vocab_size" else ""))
            out[key] = whole
        elif key in _POSITIVE_NUMBERS:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                refuse(key, "a positive number")
    dim, heads = out["dim"], out["n_heads"]
    kv = out.get("n_kv_heads") or heads
    if dim % heads or (dim // heads) % 2:
        refuse("n_heads", f"a head count that divides {names.get('dim', 'dim')} {dim} into heads of an even size "
                          f"(rotary embeddings turn pairs of channels)")
    if heads % kv:
        refuse("n_kv_heads", f"a number that divides {names.get('n_heads', 'n_heads')} {heads}")
    return out


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


# torch.save writes a zip archive; the legacy format (torch < 1.6) starts with a pickle's PROTO opcode.
_PTH_STARTS = (b"PK\x03\x04", b"\x80")


def _refuse_non_pth(path: Path) -> None:
    """A file that cannot be a torch.save file (an HTML error page, a text file) gets a plain answer here, before
    torch.load would answer with unpickling errors and advice to retry with weights_only=False."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(_PTH_STARTS):
        return
    start = head.split(b"\n")[0][:20].decode("utf-8", "backslashreplace")
    what = "it is empty" if not head else f"it starts with {start!r}..."
    raise CheckpointError(f"{path} is not a PyTorch checkpoint ({what}; the download probably failed): download it "
                          f"again and check it against checklist.chk")


def _torch_load(path: Path):
    _refuse_non_pth(path)
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
                # torch's own message ends in advice to retry with weights_only=False, i.e. to run the file's code;
                # only the name of the refused global is kept.
                found = re.search(r"(?i)unsupported (?:global: )?GLOBAL [\w.]+", str(e))
                raise CheckpointError(
                    f"refused to load {self.path}: it is not a plain tensor checkpoint (weights_only=True rejects "
                    f"pickled code{': ' + found.group(0) if found else ''}). Only load checkpoints from sources you "
                    f"trust, converted to tensors only"
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
    return dict(iter_local_tensors(ckpt_dir, expected, rank, world_size, readers))


def iter_local_tensors(ckpt_dir, expected: Dict[str, torch.Tensor], rank: int, world_size: int,
                       readers: Optional[List[ShardReader]] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """``load_local_state_dict`` one tensor at a time (the names are checked before the first is read), so a
    caller can turn each into what it keeps (e.g. int8) before the next is read."""
    readers = readers if readers is not None else open_shards(ckpt_dir)
    keys = set(readers[0].keys())
    missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} does not match params.json: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, ref in expected.items():
        tensor = read_slice(readers, name, rank, world_size)
        if tuple(tensor.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{name}: the checkpoint's shards give shape {tuple(global_shape(readers, name))} "
                f"(this rank's slice {tuple(tensor.shape)}) but params.json implies {tuple(ref.shape)} per rank; "
                f"params.json and the shards disagree"
            )
        yield name, tensor


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


# ---------------------------------------------------------------------------------------------------------------
# Destinations: written in a temporary folder beside DST, renamed into place when complete
# ---------------------------------------------------------------------------------------------------------------
# Staging folders are named .DST.tmp-PID@HOST-RANDOM (the new output) and .DST.old-PID@HOST-RANDOM (the previous
# DST during an --overwrite swap). A run that is killed outright (SIGKILL, power loss) leaves one behind; the next run
# into the same parent removes it when it is stale: its HOST is this machine and process PID is gone, or it has not
# changed for STALE_AFTER_S (PIDs get reused, and another machine's PIDs cannot be checked on a shared file system).
# A stale .old- folder is removed only when DST exists (the swap finished); otherwise it is the user's previous DST
# and is only reported.
STALE_AFTER_S = 24 * 3600
_STAGING_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)@(?P<host>[^@/]*)-[0-9a-f]{8}$")
_LEGACY_TMP_RE = re.compile(r"^\..+\.tmp-[a-z0-9_]{8}$")  # tempfile.mkdtemp names of earlier versions: age rule only


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:32]


def _staging_name(dst: Path, kind: str) -> Path:
    return dst.with_name(f".{dst.name}.{kind}-{os.getpid()}@{_host()}-{secrets.token_hex(4)}")


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there; rely on the age rule
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def _stale_reason(path: Path, pid: Optional[int], host: Optional[str]) -> Optional[str]:
    age = time.time() - path.lstat().st_mtime
    if age > STALE_AFTER_S:
        return f"unchanged for {age / 3600:.0f} hours"
    if pid is not None and host == _host() and not _pid_alive(pid):
        return f"process {pid} is gone"
    return None


def clean_stale_staging(parent: Path) -> None:
    """Remove (or, for a previous DST that was not replaced, report) the staging folders of killed runs in
    ``parent``, one line each on stderr; see the rule above."""
    for path in sorted(parent.iterdir()):
        m = _STAGING_RE.match(path.name)
        if not (m or _LEGACY_TMP_RE.match(path.name)) or path.is_symlink() or not path.is_dir():
            continue
        reason = _stale_reason(path, int(m["pid"]), m["host"]) if m else _stale_reason(path, None, None)
        if reason is None:
            continue
        if m and m["kind"] == "old" and not (parent / m["name"]).exists():
            print(f"note: {path} holds the previous {m['name']} of an --overwrite that was interrupted ({reason}); "
                  f"rename it back to {parent / m['name']}, or delete it", file=sys.stderr)
            continue
        shutil.rmtree(path, ignore_errors=True)
        print(f"removed {path}, left by an interrupted conversion ({reason})", file=sys.stderr)


def _overlap(src: Path, dst: Path) -> Optional[str]:
    """How ``dst`` overlaps ``src`` ("is", "is inside", "contains"), after symlinks, or None."""
    s, d = Path(os.path.realpath(src)), Path(os.path.realpath(dst))
    if s == d or (src.exists() and dst.exists() and os.path.samefile(src, dst)):
        return "is"
    if s in d.parents:
        return "is inside"
    if d in s.parents:
        return "contains"
    return None


def prepare_destination(dst, overwrite: bool, sources: Iterable = ()) -> Path:
    """Check ``dst`` before anything is read or written (nothing is created). It may not be, lie inside or contain
    one of ``sources`` (the paths being converted), even with --overwrite: replacing it would delete or change what
    the conversion reads. A non-empty ``dst`` needs ``overwrite``."""
    dst = Path(dst)
    for src in sources:
        relation = _overlap(Path(src), dst)
        if relation:
            raise CheckpointError(
                f"destination {dst} {relation} the source {src}; a conversion never writes over what it reads "
                f"(not even with --overwrite): choose a destination outside {src}, e.g. a new folder beside it"
            )
    if dst.exists() and not overwrite:
        if not dst.is_dir():
            raise CheckpointError(f"destination {dst} exists; choose another path or pass --overwrite")
        if any(dst.iterdir()):
            raise CheckpointError(f"destination {dst} exists and is not empty; choose another folder or pass "
                                  f"--overwrite")
    return dst


def commit_folder(tmp: Path, dst: Path) -> None:
    """Move a finished temporary folder to ``dst`` durably; an old ``dst`` is removed only after the new one is in
    place, and put back if the swap is interrupted."""
    for path in tmp.iterdir():
        fsync_file(path)
    replace_folder(tmp, dst, _staging_name(dst, "old"))


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While the block runs, SIGTERM raises SystemExit(143) the way Ctrl-C raises KeyboardInterrupt, so the
    temporary folder is removed on the way out. Installed only where SIGTERM has its default action (which kills
    without any cleanup; a handler someone else installed is theirs to keep) and only in the main thread (the one
    that may set handlers); the previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def raise_exit(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, raise_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def staged_folder(dst, *, overwrite: bool = False, sources: Iterable = ()) -> Iterator[Path]:
    """An empty temporary folder beside ``dst`` (checked by ``prepare_destination``) for the block to write into.
    When the block ends normally it replaces ``dst``; on an error, Ctrl-C or SIGTERM it is removed. Its mode is what
    the umask gives a plain mkdir (tempfile.mkdtemp's 0700 would carry over to the final folder)."""
    dst = prepare_destination(dst, overwrite, sources)
    dst.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(dst.parent)
    with _sigterm_raises():
        tmp = _staging_name(dst, "tmp")
        try:
            tmp.mkdir(mode=0o777)
            yield tmp
            commit_folder(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def write_checkpoint(dst, params: dict, shards: Iterable[Iterator[Tuple[str, torch.Tensor]]], *,
                     fmt: str = "safetensors", overwrite: bool = False, extra_files: Iterable[Path] = (),
                     sources: Iterable = ()) -> Path:
    """Write a Meta-layout folder: params.json, consolidated.NN.<fmt> (one per item of ``shards``, each an
    iterator of (name, tensor)), copies of ``extra_files`` (e.g. tokenizer.model) and checklist.chk.
    ``sources``: the paths the tensors come from, which ``dst`` may not overlap."""
    if fmt not in ("safetensors", "pth"):
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; use 'safetensors' or 'pth'")
    dst = Path(dst)
    with staged_folder(dst, overwrite=overwrite, sources=sources) as tmp:
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
    return dst


def companion_files(ckpt_dir) -> List[Path]:
    """The files of a Meta folder that are not weights (tokenizer*.model, *.json other than params.json, ...), which
    a rewrite of the weights carries over; params.json and checklist.chk are written anew, hidden files (temporary
    ones) and subfolders are not part of a checkpoint."""
    return sorted(p for p in Path(ckpt_dir).iterdir()
                  if p.is_file() and not p.name.startswith(".") and not _SHARD_RE.match(p.name)
                  and p.name not in (PARAMS_FILE, "checklist.chk"))


def reshard(src, dst, mp: int, *, fmt: Optional[str] = None, overwrite: bool = False) -> Path:
    """Rewrite a Meta checkpoint with any shard count as ``mp`` shards, one output shard in memory at a time,
    into a new folder (``dst`` may not be ``src``: reshard beside it and rename)."""
    prepare_destination(dst, overwrite, [src])  # before reading anything
    source = MetaCheckpoint(src)  # params.json checked against the shards' shapes
    params, readers = source.params, source.readers
    check_model_parallel_size(params, mp)
    fmt = fmt or ("safetensors" if readers[0].path.suffix == ".safetensors" else "pth")

    def shard(rank):
        for name in readers[0].keys():
            yield name, read_slice(readers, name, rank, mp)

    return write_checkpoint(dst, params, (shard(r) for r in range(mp)), fmt=fmt, overwrite=overwrite,
                            extra_files=companion_files(src), sources=[src])


# ---------------------------------------------------------------------------------------------------------------
# The object Llama.build loads from. Other layouts (HF) provide the same three members.
# ---------------------------------------------------------------------------------------------------------------
def expected_shapes(params: dict, vocab_size: int) -> Dict[str, Tuple[int, ...]]:
    """Every Meta tensor of the model ``params`` describes, with its full (unsharded) shape, in Meta's order."""
    args = ModelArgs(**{**params, "vocab_size": vocab_size})
    dim, q, kv, hidden = args.dim, args.n_heads * args.head_dim, args.kv_heads * args.head_dim, args.ffn_hidden_dim
    shapes = {"tok_embeddings.weight": (vocab_size, dim)}
    for i in range(args.n_layers):
        for name, shape in (("attention.wq", (q, dim)), ("attention.wk", (kv, dim)), ("attention.wv", (kv, dim)),
                            ("attention.wo", (dim, q)), ("feed_forward.w1", (hidden, dim)),
                            ("feed_forward.w2", (dim, hidden)), ("feed_forward.w3", (hidden, dim)),
                            ("attention_norm", (dim,)), ("ffn_norm", (dim,))):
            shapes[f"layers.{i}.{name}.weight"] = shape
    shapes.update({"norm.weight": (dim,), "output.weight": (vocab_size, dim)})
    return shapes


class MetaCheckpoint:
    """A Meta-layout folder: ``params`` (dict), ``vocab_size``, ``local_state_dict(expected, rank, world_size)`` and
    its one-tensor-at-a-time form ``local_tensors``."""

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
        self.check_shapes()

    def check_shapes(self) -> None:
        """params.json must describe the weights the shards hold (a converter would otherwise write a model whose
        config contradicts its tensors): every expected tensor present, with its full shape."""
        have = [n for n in self.readers[0].keys() if n not in IGNORED_KEYS]
        for name, shape in expected_shapes(self.params, self.vocab_size).items():
            if name not in have:
                raise CheckpointError(f"{self.ckpt_dir}: params.json and the shards disagree: params.json describes "
                                      f"{name}, which the shards lack; restore the params.json of these weights")
            got = global_shape(self.readers, name)
            if tuple(got) != tuple(shape):
                raise CheckpointError(f"{self.ckpt_dir}: {name}: params.json and the shards disagree (params.json "
                                      f"implies shape {tuple(shape)}, the shards hold {tuple(got)}); restore the "
                                      f"params.json of these weights")

    def local_state_dict(self, expected: Dict[str, torch.Tensor], rank: int, world_size: int):
        return load_local_state_dict(self.ckpt_dir, expected, rank, world_size, self.readers)

    def local_tensors(self, expected: Dict[str, torch.Tensor], rank: int, world_size: int):
        return iter_local_tensors(self.ckpt_dir, expected, rank, world_size, self.readers)


def is_meta_folder(path) -> bool:
    """A folder in Meta's layout: params.json and/or consolidated.NN.pth / .safetensors shards."""
    names = [p.name for p in Path(path).iterdir()]
    return PARAMS_FILE in names or any(_SHARD_RE.match(n) for n in names)
