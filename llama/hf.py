"""Hugging Face layout: ``config.json`` + ``model.safetensors`` (or ``model-0000k-of-0000n.safetensors`` with
``model.safetensors.index.json``), read as Meta-named tensors and written from them.

Names map one to one (``model.layers.{i}.self_attn.q_proj.weight`` <-> ``layers.{i}.attention.wq.weight``,
gate/up/down = w1/w3/w2, ...). The rows of q and k differ in order: Meta rotates adjacent pairs (x[2i], x[2i+1]),
transformers rotates the two halves of each head (x[i], x[i + head_dim/2]), so each head's rows are permuted
(``permute_to_hf`` / ``permute_to_meta``; k uses the kv heads). The permutation stays inside a head, so a
model-parallel rank reads its whole heads from the HF tensor and permutes only those.

Reading is lazy (one ``safe_open`` per tensor read, a slice where a rank needs only part); writing holds at most
one output shard in memory and goes through a temporary folder renamed into place at the end.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llama.checkpoint import (
    PARAMS_FILE,
    CheckpointError,
    MetaCheckpoint,
    check_model_parallel_size,
    check_params,
    expected_shapes,
    global_shape,
    open_shards,
    prepare_destination,
    read_slice,
    staged_folder,
    write_checkpoint,
)
from llama.model import ffn_params_for
from llama.parallel import shard_dim_of

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.model"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REQUIRED_CONFIG = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
DEFAULT_MAX_POSITIONS = 4096  # Llama 2's training context; Meta's params.json does not record it
# config.json's name for each params.json field, so that a bad value is reported under the name the file uses
CONFIG_NAMES = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
                "n_kv_heads": "num_key_value_heads", "vocab_size": "vocab_size", "hidden_dim": "intermediate_size",
                "norm_eps": "rms_norm_eps", "rope_theta": "rope_theta"}

_GLOBAL_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_META_GLOBAL = {v: k for k, v in _GLOBAL_NAMES.items()}
_META_LAYER = {v: k for k, v in _LAYER_NAMES.items()}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # old transformers saved the rotary table; it is not a parameter


# ---------------------------------------------------------------------------------------------------------------
# Names, permutation, config
# ---------------------------------------------------------------------------------------------------------------
def hf_name(meta_name: str) -> str:
    if meta_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[meta_name]
    parts = meta_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise CheckpointError(f"{meta_name!r} is not a Llama 2 parameter name; no Hugging Face name for it")


def meta_name(name: str) -> Optional[str]:
    """The Meta name of an HF tensor name, or None for one that is not a Llama 2 parameter."""
    if name in _META_GLOBAL:
        return _META_GLOBAL[name]
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _META_LAYER:
        return f"layers.{parts[2]}.{_META_LAYER[parts[3]]}"
    return None


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rotary rows -> transformers' half-split rows, per head."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of ``permute_to_hf``."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def rotary_heads(name: str, params: dict) -> Optional[int]:
    """How many heads a Meta tensor's rows hold if they are rotary-permuted (wq, wk), else None."""
    if name.endswith("attention.wq.weight"):
        return params["n_heads"]
    if name.endswith("attention.wk.weight"):
        return params.get("n_kv_heads") or params["n_heads"]
    return None


def dtype_of(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    if name not in DTYPES:
        raise CheckpointError(f"dtype {name!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def parse_size(size: Union[int, str]) -> int:
    """Bytes in ``5GB`` / ``200MB`` / ``10KiB`` / an int (transformers' convention: GB = 10**9)."""
    if isinstance(size, int) and size > 0:
        return size
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    text = str(size).strip().upper()
    number = text.rstrip("KMGTIB")
    try:
        value = float(number) * units[text[len(number):]]
    except (ValueError, KeyError):
        value = 0
    if value < 1:
        raise CheckpointError(f"max_shard_size {size!r} is not a size; write e.g. 5GB, 500MB or a number of bytes")
    return int(value)


def config_from_params(params: dict, *, vocab_size: int, hidden_dim: int, dtype: str,
                       max_position_embeddings: int = DEFAULT_MAX_POSITIONS, bos_id: int = 1,
                       eos_id: int = 2) -> dict:
    """A LlamaConfig (config.json) for a Meta model. ``hidden_dim`` is the FFN width read from the tensors."""
    n_heads = params["n_heads"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": params["dim"],
        "intermediate_size": hidden_dim,
        "num_hidden_layers": params["n_layers"],
        "num_attention_heads": n_heads,
        "num_key_value_heads": params.get("n_kv_heads") or n_heads,
        "head_dim": params["dim"] // n_heads,
        "hidden_act": "silu",
        "rms_norm_eps": params.get("norm_eps", 1e-5),
        "rope_theta": float(params.get("rope_theta", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": max_position_embeddings,
        "vocab_size": vocab_size,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": dtype,
    }


def params_from_config(config: dict, path: Path) -> dict:
    """Meta's params.json for a LlamaConfig; refuses what a Llama 2 model cannot represent."""
    missing = [k for k in REQUIRED_CONFIG if config.get(k) is None]
    if missing:
        raise CheckpointError(f"{path} lacks the required fields {missing}; a Llama config.json needs "
                              f"{list(REQUIRED_CONFIG)} (num_key_value_heads, rms_norm_eps and rope_theta default)")
    if config.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{path} describes a {config['model_type']!r} model; only model_type 'llama' converts")
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{path} has hidden_act {config['hidden_act']!r}; Llama 2 uses 'silu'")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise CheckpointError(f"{path} sets {key}: true; Llama 2 linears have no bias")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{path}: rope_scaling is {json.dumps(rope)}, expected null or an object")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        raise CheckpointError(f"{path} uses rope scaling {rope_type!r}; Llama 2's rotary embedding has none")
    raw = {"dim": config["hidden_size"], "n_layers": config["num_hidden_layers"],
           "n_heads": config["num_attention_heads"], "n_kv_heads": config.get("num_key_value_heads"),
           "vocab_size": config["vocab_size"], "hidden_dim": config["intermediate_size"],
           "norm_eps": config.get("rms_norm_eps", 1e-6),
           "rope_theta": rope.get("rope_theta", config.get("rope_theta", 10000.0))}
    checked = check_params(raw, path, CONFIG_NAMES)
    dim, n_heads = checked["dim"], checked["n_heads"]
    n_kv = checked["n_kv_heads"] or n_heads
    if config.get("head_dim") not in (None, dim // n_heads):
        raise CheckpointError(f"{path} sets head_dim {config['head_dim']} but hidden_size / num_attention_heads is "
                              f"{dim // n_heads}; Llama 2 has no separate head_dim")
    params = {"dim": dim, "n_layers": checked["n_layers"], "n_heads": n_heads}
    if n_kv != n_heads:
        params["n_kv_heads"] = n_kv
    params.update(vocab_size=checked["vocab_size"], **ffn_params_for(dim, checked["hidden_dim"]),
                  norm_eps=checked["norm_eps"], rope_theta=float(checked["rope_theta"]))
    return params


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------------------------------
# Progress (tqdm when installed, else a plain counter on stderr)
# ---------------------------------------------------------------------------------------------------------------
class _Counter:
    """tqdm's update/close, printed as plain lines on stderr (at most every 2 s, and at the end)."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self.last = total, desc, 0, time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= 2.0:
            self._print()

    def close(self) -> None:
        self._print()

    def _print(self) -> None:
        self.last = time.monotonic()
        print(f"{self.desc}: {self.n}/{self.total} tensors", file=sys.stderr, flush=True)


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool = True):
    """An object with ``update()`` and ``close()``: tqdm when it is installed (an optional extra), else a counter."""
    if not enabled:
        return _Silent()
    try:
        from tqdm import tqdm
    except ImportError:
        return _Counter(total, desc)
    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------
def is_hf_folder(path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


class HFCheckpoint:
    """An HF folder seen as a Meta checkpoint: ``params`` (params.json dict), ``vocab_size``,
    ``local_state_dict(expected, rank, world_size)`` (or one tensor at a time: ``local_tensors``), plus ``keys()``,
    ``shape(name)`` and ``read(name, rank, ws)`` in Meta names and Meta's row order."""

    def __init__(self, ckpt_dir):
        self.ckpt_dir = Path(ckpt_dir)
        config_path = self.ckpt_dir / CONFIG_FILE
        if not config_path.is_file():
            raise CheckpointError(f"{config_path} is missing; a Hugging Face model folder holds config.json")
        self.config = read_json(config_path)
        self.params = params_from_config(self.config, config_path)
        self.files = self._weight_files()  # HF name -> file
        self.tied = bool(self.config.get("tie_word_embeddings", False))
        self.sources: Dict[str, str] = {}  # Meta name -> HF name
        unknown = []
        for name in self.files:
            meta = meta_name(name)
            if meta is not None:
                self.sources[meta] = name
            elif not name.endswith(_IGNORED_SUFFIXES):
                unknown.append(name)
        if unknown:
            raise CheckpointError(f"{self.ckpt_dir} holds tensors a Llama 2 model has no place for: {unknown[:5]}"
                                  f"{'...' if len(unknown) > 5 else ''}")
        if "tok_embeddings.weight" not in self.sources:
            raise CheckpointError(f"{self.ckpt_dir} has no model.embed_tokens.weight; is it a Llama model?")
        if self.tied or "output.weight" not in self.sources:
            if not self.tied:
                raise CheckpointError(f"{self.ckpt_dir} has no lm_head.weight and config.json does not set "
                                      f"tie_word_embeddings: true")
            self.sources["output.weight"] = self.sources["tok_embeddings.weight"]  # Meta never ties: a copy
        self.vocab_size = self._shape(self.sources["tok_embeddings.weight"])[0]
        if self.vocab_size != self.config["vocab_size"]:
            raise CheckpointError(f"config.json says vocab_size={self.config['vocab_size']} but "
                                  f"model.embed_tokens.weight has {self.vocab_size} rows")

    def _weight_files(self) -> Dict[str, Path]:
        index, single = self.ckpt_dir / INDEX_FILE, self.ckpt_dir / WEIGHTS_FILE
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no weight_map; it should map tensor names to shard files")
            files = {name: self._listed_file(index, name, fname) for name, fname in weight_map.items()}
            for path in sorted(set(files.values())):
                if not path.is_file():
                    raise CheckpointError(f"{index} points at {path.name}, which is missing from {self.ckpt_dir}; "
                                          f"download the missing shard")
            return files
        if single.is_file():
            with self._open(single) as f:
                return {name: single for name in f.keys()}
        found = sorted(p.name for p in self.ckpt_dir.iterdir())
        hint = (" PyTorch .bin weights are not read (they are pickles): re-save with "
                "save_pretrained(..., safe_serialization=True)" if any(n.endswith(".bin") for n in found) else "")
        raise CheckpointError(f"{self.ckpt_dir} has config.json but neither {WEIGHTS_FILE} nor {INDEX_FILE} "
                              f"(found {found[:10]}).{hint}")

    def _listed_file(self, index: Path, tensor: str, fname) -> Path:
        """The shard an index entry names. A file from the internet decides which path is opened, so the name must
        be relative, without "..", and stay inside the folder after symlinks. One exception: the Hugging Face cache,
        whose snapshots/REV/ files are symlinks into the repository's blobs/ folder."""
        folder = Path(os.path.realpath(self.ckpt_dir))
        allowed = [folder] + ([folder.parent.parent / "blobs"] if folder.parent.name == "snapshots" else [])
        ok = isinstance(fname, str) and fname != "" and not Path(fname).is_absolute() and ".." not in Path(fname).parts
        if ok:
            real = Path(os.path.realpath(self.ckpt_dir / fname))
            ok = any(a in real.parents for a in allowed)
        if not ok:
            raise CheckpointError(f"{index}: the weight_map entry {tensor!r}: {json.dumps(fname)} points outside "
                                  f"{self.ckpt_dir}; shard files must be plain file names in the model folder: "
                                  f"download the model again from a source you trust")
        return self.ckpt_dir / fname

    @staticmethod
    def _open(path: Path):
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {path} as safetensors ({e}); the file may be truncated") from e

    def _shape(self, hf: str) -> Tuple[int, ...]:
        with self._open(self.files[hf]) as f:
            try:
                return tuple(f.get_slice(hf).get_shape())
            except Exception as e:
                raise CheckpointError(f"{self.files[hf].name} does not hold {hf} although the index says so") from e

    def keys(self) -> List[str]:
        return list(self.sources)

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._shape(self.sources[name])

    def read(self, name: str, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Rank ``rank``'s slice (along Meta's shard dim) of Meta tensor ``name``, in Meta's row order, reading
        only that slice from disk."""
        hf = self.sources[name]
        dim = shard_dim_of(name)
        heads = rotary_heads(name, self.params)
        shape = self._shape(hf)  # also a clear error when the file lacks the tensor its index promises
        total = shape[dim] if dim is not None else 0
        if world_size > 1 and dim is not None and (heads or total) % world_size:
            what = f"{heads} heads" if heads else f"{total} rows along dim {dim}"
            raise CheckpointError(f"{name} has {what}, which cannot be split over {world_size} processes; "
                                  f"use a model parallel size that divides it")
        with self._open(self.files[hf]) as f:
            if dim is None or world_size == 1:
                tensor = f.get_tensor(hf)
            else:
                start, stop = rank * total // world_size, (rank + 1) * total // world_size
                sl = f.get_slice(hf)
                tensor = sl[start:stop] if dim == 0 else sl[:, start:stop]
        if heads:  # whole heads were read, so the per-head permutation applies to the slice alone
            tensor = permute_to_meta(tensor, heads // world_size)
        return tensor

    def local_state_dict(self, expected: Dict[str, torch.Tensor], rank: int, world_size: int):
        return dict(self.local_tensors(expected, rank, world_size))

    def local_tensors(self, expected: Dict[str, torch.Tensor], rank: int, world_size: int):
        """(name, this rank's tensor) one at a time, checked against ``expected`` (names first, then each shape)."""
        missing, unexpected = sorted(set(expected) - set(self.sources)), sorted(set(self.sources) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"checkpoint {self.ckpt_dir} does not match its config.json: missing "
                                  f"{[hf_name(m) for m in missing[:5]]}, unexpected {unexpected[:5]}")
        for name, ref in expected.items():
            tensor = self.read(name, rank, world_size)
            if tuple(tensor.shape) != tuple(ref.shape):
                raise CheckpointError(
                    f"{self.sources[name]}: the file gives shape {self.shape(name)} (this rank's slice "
                    f"{tuple(tensor.shape)}) but config.json implies {tuple(ref.shape)} per rank; config.json and "
                    f"the weights disagree"
                )
            yield name, tensor


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------
def tokenizer_files(tokenizer_model: Path, max_length: int) -> Dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json that let transformers' LlamaTokenizer / AutoTokenizer
    read ``tokenizer.model`` and encode like ``llama.tokenizer.Tokenizer(...).encode(s, bos=True, eos=False)``."""
    from llama.tokenizer import Tokenizer

    tok = Tokenizer(str(tokenizer_model))
    sp = tok.sp_model

    def piece(i):
        return sp.id_to_piece(i) if 0 <= i < tok.n_words else None

    special = {"bos_token": piece(tok.bos_id), "eos_token": piece(tok.eos_id), "unk_token": piece(sp.unk_id())}
    if tok.pad_id >= 0:
        special["pad_token"] = piece(tok.pad_id)
    config = {"tokenizer_class": "LlamaTokenizer", **special, "pad_token": special.get("pad_token"),
              "add_bos_token": tok.bos_id >= 0, "add_eos_token": False, "legacy": True,
              "clean_up_tokenization_spaces": False, "model_max_length": max_length, "sp_model_kwargs": {}}
    return {"tokenizer_config.json": config,
            "special_tokens_map.json": {k: v for k, v in special.items() if v is not None}}


def write_hf(dst, config: dict, tensors: Iterable[Tuple[str, torch.Tensor]], *, max_shard_size="5GB",
             overwrite: bool = False, tokenizer: Optional[Path] = None, sources: Iterable = ()) -> Path:
    """Write an HF folder from (HF name, tensor) pairs, cutting a new ``model-k-of-n.safetensors`` whenever the
    next tensor would take the current one past ``max_shard_size`` (a single larger tensor gets a file of its own);
    one shard is in memory at a time. One file is named ``model.safetensors`` and needs no index. ``sources``: the
    paths the tensors come from, which ``dst`` may not overlap."""
    limit = parse_size(max_shard_size)
    dst = Path(dst)
    with staged_folder(dst, overwrite=overwrite, sources=sources) as tmp:
        shards: List[List[str]] = []
        buffer: Dict[str, torch.Tensor] = {}
        size = total_size = total_params = 0

        def flush():
            save_file(buffer, str(tmp / f"part-{len(shards)}.safetensors"), metadata={"format": "pt"})
            shards.append(list(buffer))
            buffer.clear()

        for name, tensor in tensors:
            nbytes = tensor.numel() * tensor.element_size()
            if buffer and size + nbytes > limit:
                flush()
                size = 0
            buffer[name] = tensor.contiguous()
            size += nbytes
            total_size += nbytes
            total_params += tensor.numel()
        if buffer or not shards:
            flush()
        del buffer
        if len(shards) == 1:
            (tmp / "part-0.safetensors").rename(tmp / WEIGHTS_FILE)
        else:
            weight_map = {}
            for k, names in enumerate(shards):
                fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                (tmp / f"part-{k}.safetensors").rename(tmp / fname)
                weight_map.update((n, fname) for n in names)
            index = {"metadata": {"total_size": total_size, "total_parameters": total_params},
                     "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        generation = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id")}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
            for fname, content in tokenizer_files(tokenizer, config["max_position_embeddings"]).items():
                (tmp / fname).write_text(json.dumps(content, indent=2) + "\n")
    return dst


# ---------------------------------------------------------------------------------------------------------------
# Conversions
# ---------------------------------------------------------------------------------------------------------------
def meta_to_hf(src, dst, *, dtype: Optional[str] = None, max_shard_size="5GB", overwrite: bool = False,
               tokenizer: Optional[str] = None, max_position_embeddings: int = DEFAULT_MAX_POSITIONS,
               show_progress: bool = True) -> Path:
    """A Meta folder (any shard count) -> an HF folder, one tensor read at a time. ``dtype`` None keeps the
    stored dtype; ``tokenizer`` defaults to SRC/tokenizer.model when there is one."""
    src = Path(src)
    prepare_destination(dst, overwrite, [src])  # before reading anything
    if not (src / PARAMS_FILE).is_file() and is_hf_folder(src):
        raise CheckpointError(f"{src} is a Hugging Face folder (config.json), not a Meta one; use hf_to_meta")
    source = MetaCheckpoint(src)  # params.json checked against the shards' shapes
    params, readers = source.params, source.readers
    names = readers[0].keys()
    stored = readers[0].get("norm.weight" if "norm.weight" in names else names[0]).dtype  # a small tensor
    out_dtype = dtype_of(dtype) or stored
    dtype_name = {v: k for k, v in DTYPES.items()}.get(out_dtype)
    if dtype_name is None:
        raise CheckpointError(f"{src} stores {out_dtype}, which an HF checkpoint here cannot hold; pass --dtype "
                              f"with one of {sorted(DTYPES)}")
    for required in ("tok_embeddings.weight", "layers.0.feed_forward.w1.weight"):
        if required not in names:
            raise CheckpointError(f"{readers[0].path} has no {required}; is it a Llama checkpoint?")
    vocab_size = global_shape(readers, "tok_embeddings.weight")[0]
    hidden_dim = global_shape(readers, "layers.0.feed_forward.w1.weight")[0]
    tok_path = Path(tokenizer) if tokenizer else (src / TOKENIZER_FILE if (src / TOKENIZER_FILE).is_file() else None)
    if tok_path is not None and not tok_path.is_file():
        raise CheckpointError(f"tokenizer {tok_path} not found; pass --tokenizer pointing at tokenizer.model")
    bos_eos = {}
    if tok_path is not None:
        from llama.tokenizer import Tokenizer

        tok = Tokenizer(str(tok_path))
        bos_eos = {"bos_id": tok.bos_id, "eos_id": tok.eos_id}
    config = config_from_params(params, vocab_size=vocab_size, hidden_dim=hidden_dim, dtype=dtype_name,
                                max_position_embeddings=max_position_embeddings, **bos_eos)

    limit = parse_size(max_shard_size)

    def tensors(shards):
        read = 0
        for name in names:
            t = read_slice(shards, name, 0, 1)
            heads = rotary_heads(name, params)
            if heads:
                t = permute_to_hf(t, heads)
            yield hf_name(name), t.to(out_dtype)
            bar.update()
            read += t.numel() * t.element_size()
            if read >= limit:
                # A memory-mapped .pth stays mapped while its reader lives, and every page read stays in this
                # process's RSS (as clean page cache). Reopening about once per output shard releases them.
                shards, read = open_shards(src), 0

    stream = tensors(readers)
    del readers  # the generator owns them now, and lets them go as it reopens
    bar = progress_bar(len(names), "meta_to_hf", show_progress)
    try:
        return write_hf(dst, config, stream, max_shard_size=max_shard_size, overwrite=overwrite,
                        tokenizer=tok_path, sources=[src])
    finally:
        bar.close()


def hf_to_meta(src, dst, *, mp: int = 1, fmt: str = "safetensors", overwrite: bool = False,
               show_progress: bool = True) -> Path:
    """An HF folder -> a Meta folder of ``mp`` shards; each shard is built from slices of the HF tensors."""
    src = Path(src)
    prepare_destination(dst, overwrite, [src])  # before reading anything
    if not is_hf_folder(src) and (src / PARAMS_FILE).is_file():
        raise CheckpointError(f"{src} is a Meta folder (params.json), not a Hugging Face one; use meta_to_hf")
    ckpt = HFCheckpoint(src)
    check_model_parallel_size(ckpt.params, mp)
    shapes = expected_shapes(ckpt.params, ckpt.vocab_size)
    missing, unexpected = sorted(set(shapes) - set(ckpt.keys())), sorted(set(ckpt.keys()) - set(shapes))
    if missing or unexpected:
        raise CheckpointError(f"{src} does not match its config.json: missing {[hf_name(m) for m in missing[:5]]}, "
                              f"unexpected {[hf_name(u) for u in unexpected[:5]]}")
    for name, shape in shapes.items():  # refuse before writing anything
        if ckpt.shape(name) != shape:
            raise CheckpointError(f"{ckpt.sources[name]} has shape {ckpt.shape(name)} but config.json implies "
                                  f"{shape}; config.json and the weights disagree")
        dim = shard_dim_of(name)
        if dim is not None and shape[dim] % mp:
            raise CheckpointError(f"{name} has {shape[dim]} rows along dim {dim}, which {mp} shards cannot split; "
                                  f"choose a shard count that divides it")
    names = list(shapes)  # Meta's order: embedding, layers, norm, output
    extras = [src / TOKENIZER_FILE] if (src / TOKENIZER_FILE).is_file() else []
    bar = progress_bar(len(names) * mp, "hf_to_meta", show_progress)

    def shard(rank):
        for name in names:
            yield name, ckpt.read(name, rank, mp)
            bar.update()

    try:
        return write_checkpoint(dst, ckpt.params, (shard(r) for r in range(mp)), fmt=fmt, overwrite=overwrite,
                                extra_files=extras, sources=[src])
    finally:
        bar.close()
