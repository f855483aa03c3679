"""Checkpoint to model: this process's shard of any checkpoint (Meta, HF, safetensors; any shard count), on its
device and dtype, with the KV cache allocated -- after the checks that would otherwise fail late or silently."""
from __future__ import annotations

import ctypes
import gc
import os
from pathlib import Path
from typing import Optional

import torch

from llama.checkpoint import CheckpointError, MetaCheckpoint, is_meta_folder
from llama.kernels import libc
from llama.errors import UserError
from llama.files import sha256_file
from llama.hf import HFCheckpoint, is_hf_folder
from llama.model import ModelArgs, Transformer
from llama.parallel import get_model_parallel_rank, get_model_parallel_world_size
from llama.quantize import quantized_layer, quantizer
from llama.tokenizer import Tokenizer


def default_dtype(device: torch.device) -> torch.dtype:
    # CPUs here have no fast bf16 matmul, so fp32 there; bf16 on GPUs that support it, else fp16.
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def open_checkpoint(ckpt_dir):
    """Open a checkpoint folder, whatever its layout: Meta (params.json / consolidated.NN.*) -> MetaCheckpoint,
    Hugging Face (config.json + model.safetensors or its index) -> ``HFCheckpoint`` (llama/hf.py)."""
    path = Path(ckpt_dir)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {str(path)!r} does not exist; pass --ckpt_dir of a model folder")
    if is_meta_folder(path):
        return MetaCheckpoint(path)
    if is_hf_folder(path):
        return HFCheckpoint(path)
    names = sorted(p.name for p in path.iterdir())
    raise CheckpointError(
        f"{path} is not a checkpoint folder: found {names[:10]}{'...' if len(names) > 10 else ''}; expected "
        f"params.json with consolidated.NN.pth/.safetensors (Meta) or config.json with model.safetensors or "
        f"model.safetensors.index.json (Hugging Face)"
    )


def load_model(ckpt_dir, tokenizer: Tokenizer, tokenizer_path, max_seq_len: int, max_batch_size: int, *,
               device: torch.device, dtype: Optional[torch.dtype] = None, quantize=None) -> Transformer:
    """This model-parallel rank's shard of ``ckpt_dir`` as an eval-mode Transformer without gradients.
    Built on the meta device (no memory, no init), then it adopts the loaded tensors one by one. ``quantize`` (a
    ``llama.quantize.quantizer`` mode, e.g. "int8") turns each linear weight into its quantized module as soon as
    it is read, so the dense model never exists (benchmarks/load_memory.py measures the peak)."""
    dtype = dtype or default_dtype(device)
    checkpoint = open_checkpoint(ckpt_dir)
    if tokenizer.n_words != checkpoint.vocab_size:
        raise CheckpointError(
            f"the tokenizer {tokenizer_path} has {tokenizer.n_words} pieces but the checkpoint has "
            f"{checkpoint.vocab_size} embedding rows; pass the tokenizer this model was trained with"
        )
    check_saved_tokenizer(ckpt_dir, tokenizer_path)
    params = {**checkpoint.params, "max_seq_len": max_seq_len, "max_batch_size": max_batch_size,
              "vocab_size": checkpoint.vocab_size}
    model_args = ModelArgs(**params)
    check_kv_cache_fits(model_args, get_model_parallel_world_size(), dtype, device)
    model = Transformer(model_args, device="meta", dtype=dtype)
    factory = quantizer(quantize) if quantize is not None else None
    state, replaced = {}, []
    for name, tensor in checkpoint.local_tensors(model.state_dict(), get_model_parallel_rank(),
                                                 get_model_parallel_world_size()):
        kept = tensor.to(device=device, dtype=dtype)
        layer = quantized_layer(model, name) if factory is not None else None
        if layer is not None:
            with torch.no_grad():
                layer.replace_local_linear(factory(kept))
            replaced.append(name.rpartition(".")[0])
            drop_file_pages(tensor)
            tensor = kept = None  # the dense weight goes before the next one is read
            release_freed_memory()
            continue
        if factory is not None and kept.data_ptr() == tensor.data_ptr():
            # A memory-mapped checkpoint stays mapped, with the pages of every weight read through it, as long as
            # one tensor still points into it: keep a copy instead.
            kept = kept.clone()
            drop_file_pages(tensor)
        state[name] = kept
    if factory is not None:
        checkpoint = tensor = kept = None  # the shards' file mappings go now, not at some later collection
        gc.collect()
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    # As strict=True, except for the quantized modules made above (their buffers are already in place).
    stray = unexpected + [k for k in missing if k.rpartition(".local_linear.")[0] not in replaced]
    assert not stray, stray
    model.init_buffers(device, dtype)
    return model.requires_grad_(False).eval()


def release_freed_memory() -> None:
    """Give freed heap memory back to the system (glibc's malloc_trim; nothing elsewhere). Quantizing while loading
    frees one dense weight after another, and glibc keeps such chunks for reuse, so without this the process would
    stay near the dense model's size although it holds only the quantized one."""
    trim = libc("malloc_trim")
    if trim is not None:
        trim(0)


def drop_file_pages(tensor: torch.Tensor) -> None:
    """Let the kernel drop the pages of ``tensor`` where it lies in a memory-mapped file (a checkpoint read with
    mmap; Linux): the pages of a mapping count as the process's memory for as long as it is mapped, so a checkpoint
    read through to the end would otherwise sit in memory whole beside the int8 model. Only whole pages inside
    the tensor, and only inside a file mapping (never memory the process owns), are advised (MADV_DONTNEED: a
    later read of them comes from the file again)."""
    madvise = libc("madvise")
    if madvise is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return
    page = os.sysconf("SC_PAGE_SIZE")
    start = -(-tensor.data_ptr() // page) * page
    end = (tensor.data_ptr() + tensor.nbytes) // page * page
    if end > start and _in_file_mapping(start, end):
        madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED


def _in_file_mapping(start: int, end: int) -> bool:
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if lo <= start and end <= hi:
                    return len(fields) >= 6 and fields[4] != "0" and fields[5].startswith("/")
    except OSError:
        pass
    return False


def check_saved_tokenizer(ckpt_dir, tokenizer_path) -> None:
    """A checkpoint folder that carries its own SentencePiece model (the converters and the trainer copy it there)
    must be paired with it: a tokenizer of the same size but other pieces would load and silently give nonsense."""
    saved = sorted(Path(ckpt_dir).glob("*.model")) if Path(ckpt_dir).is_dir() else []
    if not saved or sha256_file(tokenizer_path) in {sha256_file(p) for p in saved}:
        return
    raise CheckpointError(f"the tokenizer {tokenizer_path} differs from {', '.join(map(str, saved))}, saved with this "
                          f"checkpoint (same size, other pieces); pass --tokenizer_path {saved[0]}")


def check_kv_cache_fits(args: ModelArgs, model_parallel_size: int, dtype: torch.dtype, device: torch.device) -> None:
    """The KV cache (max_batch_size x max_seq_len per layer, this rank's kv heads) is allocated up front; say so
    when it cannot fit, instead of failing inside the allocator."""
    nbytes = (2 * args.n_layers * args.max_batch_size * args.max_seq_len * (args.kv_heads // model_parallel_size)
              * args.head_dim * torch.empty((), dtype=dtype).element_size())
    free = available_memory(device)
    if free is not None and nbytes > free:
        raise UserError(f"the KV cache needs {nbytes / 2**30:.1f} GiB (max_seq_len {args.max_seq_len} x "
                        f"max_batch_size {args.max_batch_size} x {args.n_layers} layers) but {device} has "
                        f"{free / 2**30:.1f} GiB free; build with a smaller max_seq_len or max_batch_size")


def available_memory(device: torch.device) -> Optional[int]:
    """Free bytes on ``device`` (None where unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
