"""Which base model and tokenizer a checkpoint or adapter belongs to, cheap enough to check at every load.

``base_fingerprint(ckpt_dir)`` is ``{"params": {...}, "digest": "<sha256 hex>"}``:

* ``params``: the architecture as the weights define it: dim, n_layers, n_heads, n_kv_heads (resolved, never None),
  vocab_size (embedding rows), ffn_hidden_dim (the SwiGLU width, not multiple_of / ffn_dim_multiplier: a Hugging
  Face config stores only the width, and several (multiple_of, multiplier) pairs give the same one), norm_eps and
  rope_theta (floats, defaults filled in).
* ``digest``: sha256 over a version tag, ``params`` (sorted JSON) and, for every tensor in sorted Meta-name order,
  its name, its full (unsharded) shape and a fixed sample of its values in Meta layout, cast to float32
  little-endian bytes. The sample of a 2-D tensor of R x C is SAMPLE_ROWS = 4 rows evenly spread from the first to
  the last (row k = k (R-1) / 3, rounded down) and, in row k, SAMPLE_COLS = 64 consecutive columns starting k (C-64)/3
  of the way along: four short blocks on a diagonal from the top-left to the bottom-right corner, so every shard
  of a 2- or 4-way split and both ends of every row are looked at. A 1-D tensor (the RMSNorm weights) gives its
  first 256 values.

Why it is format-independent: the sample is defined on the global Meta tensor and located through the checkpoint
object (``llama.loading.open_checkpoint``: its shards, shapes and, for HF, Meta name -> HF name -> file): a
Meta folder's block may sit in one shard or straddle two (any shard count, .pth or .safetensors), and an HF
folder's q/k rows are stored in transformers' rotary order and are mapped back with ``llama.hf.permute_to_meta``
applied to the row indices. Values are compared as float32, so a bf16 or fp16 model and its fp32 copy hash alike; but the bf16 and
the fp16 copies of an fp32 model are rounded differently, hold other numbers and get different digests (from each
other and from the fp32 original), as they should: an adapter trained on one has seen other weights.

Why it is cheap: only the sampled blocks are read, each with one small read. Safetensors files (Meta shards and
HF files) are read with ``os.pread`` at the block's byte offset, taken from the file's header; a .pth shard is
memory-mapped (``torch.load(mmap=True)``) and marked ``MADV_RANDOM``, so touching a block reads its page. Without
that, a page fault reads the kernel's read-ahead window around it (8 MB on this project's test machine): a few
blocks would cost the whole tensor. Measured on a 0.4B-parameter bf16 model with the page cache dropped: 0.02 s,
2 MB read from a 2-shard .pth, 9 MB from safetensors (8 MB of it is ``safe_open`` reading the header when the
checkpoint is opened, once per file). A 7B model is about 290 tensors x 4 blocks of 64 values. What it cannot
see: a change confined to values outside the sample (e.g. a single edited weight, or fine-tuning only some rows
of the embedding). Anything that moves whole weights - a fine-tune, a merged LoRA, another seed, another
rounding to bf16 or fp16 - changes the sample.

``tokenizer_sha256(path)`` is the sha256 of the tokenizer model file. ``check_same_base`` compares a recorded
``{"base": fingerprint, "tokenizer_sha256": sha}`` with the one at hand and raises ``FingerprintMismatch``.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import struct
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

from llama.checkpoint import MetaCheckpoint, global_shape
from llama.errors import UserError
from llama.files import sha256_file
from llama.hf import permute_to_meta, rotary_heads
from llama.loading import open_checkpoint
from llama.model import ModelArgs
from llama.parallel import shard_dim_of

VERSION = "kollama-base-fingerprint-v1"
SAMPLE_ROWS = 4
SAMPLE_COLS = 64
SAMPLE_VECTOR = SAMPLE_ROWS * SAMPLE_COLS


class FingerprintMismatch(UserError):
    """A checkpoint or adapter met a base model or tokenizer other than the one it was made with."""


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and architecture
# ---------------------------------------------------------------------------------------------------------------
def tokenizer_sha256(path) -> str:
    return sha256_file(path)


def architecture(params: dict, vocab_size: int) -> dict:
    """The format-independent architecture of a checkpoint's params (params.json, or derived from config.json)."""
    args = ModelArgs(**{**params, "vocab_size": vocab_size})
    return {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.kv_heads,
            "vocab_size": vocab_size, "ffn_hidden_dim": args.ffn_hidden_dim, "norm_eps": float(args.norm_eps),
            "rope_theta": float(args.rope_theta)}


# ---------------------------------------------------------------------------------------------------------------
# Reading a block [row, c0:c1] of a global Meta tensor
# ---------------------------------------------------------------------------------------------------------------
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class _SafetensorsFile:
    """One safetensors file read with ``os.pread``: the header once, then each block as the exact bytes it spans.
    (``safe_open`` memory-maps the file, and a page fault reads the kernel's whole read-around window - 8 MB on
    some machines - so four 64-value blocks of a tensor would cost the entire tensor.) The format is an 8-byte
    little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the data, row-major."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(str(path), os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead around the blocks
        (size,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
        self.header = json.loads(os.pread(self.fd, size, 8))
        self.data_start = 8 + size

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def block(self, name: str, row: int, c0: int, c1: int) -> torch.Tensor:
        info = self.header[name]
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{self.path}: {name} has dtype {info['dtype']}; a model weight is a float type")
        width = dtype.itemsize
        first = row * info["shape"][-1] + c0 if len(info["shape"]) == 2 else c0  # element index, row-major
        offset = self.data_start + info["data_offsets"][0] + first * width
        data = os.pread(self.fd, (c1 - c0) * width, offset)
        return torch.frombuffer(bytearray(data), dtype=dtype)

    def close(self) -> None:
        os.close(self.fd)


def _advise_random(t: torch.Tensor) -> None:
    """Mark a memory-mapped tensor's pages as read at random, so touching a block reads its page, not the
    read-around window (see _SafetensorsFile). Best effort: a tensor that is not memory-mapped (a legacy .pth
    read into memory) or a platform without madvise is left as it is."""
    if _LIBC is None or t.numel() == 0:
        return
    storage = t.untyped_storage()
    start = storage.data_ptr() - storage.data_ptr() % mmap.PAGESIZE
    _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(storage.data_ptr() + storage.nbytes() - start),
                  mmap.MADV_RANDOM)


def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc if hasattr(libc, "madvise") and hasattr(mmap, "MADV_RANDOM") else None
    except OSError:
        return None


_LIBC = _libc()


class _Files:
    """The open safetensors files of one fingerprint, each opened once."""

    def __init__(self):
        self.open: Dict[Path, _SafetensorsFile] = {}

    def __getitem__(self, path: Path) -> _SafetensorsFile:
        if path not in self.open:
            self.open[path] = _SafetensorsFile(path)
        return self.open[path]

    def close(self) -> None:
        for f in self.open.values():
            f.close()


def _meta_blocks(ckpt: MetaCheckpoint, files: _Files) -> Tuple[List[str], Callable, Callable]:
    """(names, shape(name), read(name, row, c0, c1)) over a Meta folder's shards, in global coordinates."""
    readers = ckpt.readers

    def local(i: int, name: str, row: int, c0: int, c1: int) -> torch.Tensor:
        reader = readers[i]
        if reader.path.suffix == ".safetensors":
            return files[reader.path].block(name, row, c0, c1)
        t = reader.get(name)  # memory-mapped: indexing reads only the pages the block lies on
        _advise_random(t)
        return (t[row, c0:c1] if t.dim() == 2 else t[c0:c1]).clone()

    def read(name: str, row: int, c0: int, c1: int) -> torch.Tensor:
        dim = shard_dim_of(name)
        if dim is None:
            return local(0, name, row, c0, c1)
        size = readers[0].shape(name)[dim]  # every shard holds `size` rows (dim 0) or columns (dim 1)
        if dim == 0:
            return local(row // size, name, row % size, c0, c1)
        pieces = [local(i, name, row, max(c0, i * size) - i * size, min(c1, (i + 1) * size) - i * size)
                  for i in range(len(readers)) if max(c0, i * size) < min(c1, (i + 1) * size)]
        return torch.cat(pieces)

    return readers[0].keys(), lambda name: global_shape(readers, name), read


def _hf_blocks(ckpt, files: _Files) -> Tuple[List[str], Callable, Callable]:
    """The same over an ``llama.hf.HFCheckpoint`` (its ``sources``: Meta name -> HF name, ``files``: HF name ->
    file): Meta names, and q/k rows mapped from transformers' order."""
    row_maps: Dict[str, torch.Tensor] = {}

    def file_of(name: str) -> Tuple[_SafetensorsFile, str]:
        hf = ckpt.sources[name]
        return files[ckpt.files[hf]], hf

    def shape(name: str) -> Tuple[int, ...]:
        f, hf = file_of(name)
        return f.shape(hf)

    def read(name: str, row: int, c0: int, c1: int) -> torch.Tensor:
        heads = rotary_heads(name, ckpt.params)
        if heads:  # Meta row m is HF row order[m]: the reader's own permutation applied to the row indices
            if name not in row_maps:
                row_maps[name] = permute_to_meta(torch.arange(shape(name)[0]).unsqueeze(1), heads).squeeze(1)
            row = int(row_maps[name][row])
        f, hf = file_of(name)
        return f.block(hf, row, c0, c1)

    return ckpt.keys(), shape, read


def _sample(shape: Tuple[int, ...], read: Callable) -> torch.Tensor:
    """The fixed sample of one tensor (see the module docstring), as a float32 vector."""
    if len(shape) == 1:
        return read(0, 0, min(shape[0], SAMPLE_VECTOR)).reshape(-1).float()
    rows, cols = shape
    width = min(cols, SAMPLE_COLS)
    blocks = []
    for k in range(SAMPLE_ROWS):
        row = k * (rows - 1) // (SAMPLE_ROWS - 1)
        start = k * (cols - width) // (SAMPLE_ROWS - 1)
        blocks.append(read(row, start, start + width).reshape(-1).float())
    return torch.cat(blocks)


def base_fingerprint(ckpt_dir) -> dict:
    """``{"params": architecture, "digest": sha256 hex}`` of a Meta or HF checkpoint folder (see the module
    docstring for what is sampled); reads a few hundred KB whatever the model size."""
    ckpt = open_checkpoint(ckpt_dir)
    params = architecture(ckpt.params, ckpt.vocab_size)
    files = _Files()
    try:
        names, shape_of, read = (_meta_blocks if isinstance(ckpt, MetaCheckpoint) else _hf_blocks)(ckpt, files)
        h = hashlib.sha256(VERSION.encode())
        h.update(json.dumps(params, sort_keys=True).encode())
        for name in sorted(names):
            shape = tuple(shape_of(name))
            sample = _sample(shape, lambda row, c0, c1: read(name, row, c0, c1))
            h.update(f"\n{name} {list(shape)}\n".encode())
            h.update(sample.numpy().astype("<f4").tobytes())
    finally:
        files.close()
    return {"params": params, "digest": h.hexdigest()}


def base_record(ckpt_dir, tokenizer_path) -> dict:
    """What an adapter or checkpoint records about its base, plus where it was found (for messages):
    ``{"base": base_fingerprint, "tokenizer_sha256": ..., "ckpt_dir": ..., "tokenizer_path": ...}``."""
    return {"base": base_fingerprint(ckpt_dir), "tokenizer_sha256": tokenizer_sha256(tokenizer_path),
            "ckpt_dir": str(ckpt_dir), "tokenizer_path": str(tokenizer_path)}


# ---------------------------------------------------------------------------------------------------------------
# Comparing
# ---------------------------------------------------------------------------------------------------------------
def describe(record: dict) -> str:
    """``base 1a2b3c4d5e6f (dim 288, 6 layers) with tokenizer 9f8e7d6c5b4a``, from what the record holds."""
    base = record.get("base") or {}
    p = base.get("params") or {}
    text = f"base {str(base.get('digest', '?'))[:12]}"
    if p:
        text += f" (dim {p.get('dim')}, {p.get('n_layers')} layers)"
    if record.get("tokenizer_sha256"):
        text += f" with tokenizer {record['tokenizer_sha256'][:12]}"
    return text


def check_same_base(recorded: dict, actual: dict, what: str, allow_flag: str) -> None:
    """Raise ``FingerprintMismatch`` when ``recorded`` (``{"base": fingerprint, "tokenizer_sha256": sha}`` from a
    file) names another base digest or tokenizer than ``actual`` (``base_record(...)``). ``what`` names the file in
    the message (``adapter runs/x/adapter``), ``allow_flag`` the override (``--allow_base_mismatch``). A record
    without these fields (written before they existed) is not checked: a warning says so."""
    rec_digest = (recorded.get("base") or {}).get("digest")
    rec_tok = recorded.get("tokenizer_sha256")
    if not rec_digest and not rec_tok:
        warnings.warn(f"{what} does not record which base model and tokenizer it belongs to (written by an older "
                      f"version); it cannot be checked against {actual.get('ckpt_dir', 'the base')}", stacklevel=2)
        return
    act_digest = (actual.get("base") or {}).get("digest")
    act_tok = actual.get("tokenizer_sha256")
    base_differs = bool(rec_digest and act_digest and rec_digest != act_digest)
    tok_differs = bool(rec_tok and act_tok and rec_tok != act_tok)
    if not (base_differs or tok_differs):
        return
    where = f"--ckpt_dir {actual['ckpt_dir']}" if actual.get("ckpt_dir") else "the given base"
    if actual.get("tokenizer_path"):
        where += f" with --tokenizer_path {actual['tokenizer_path']}"
    fix = "the base and tokenizer it was trained on" if base_differs and tok_differs else (
        "the base it was trained on" if base_differs else "the tokenizer it was trained with")
    raise FingerprintMismatch(f"{what} was trained on {describe(recorded)}, but {where} is {describe(actual)}; "
                              f"pass {fix}, or {allow_flag} to load it anyway")


__all__ = ["FingerprintMismatch", "tokenizer_sha256", "architecture", "base_fingerprint", "base_record",
           "describe", "check_same_base"]
