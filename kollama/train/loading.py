"""The base model a training run starts from, on this process: its model-parallel slice, dense; with every block
linear in NF4 (QLoRA); or, under ``--fsdp``, only this process's FSDP shard of that slice (kollama/train/fsdp.py).

All three build the model on the meta device and then assign the checkpoint's tensors (memory-mapped where the
file allows), as ``llama.Llama.build`` does, so no random initialisation is computed and thrown away."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from kollama.adapters import qlora as Q
from llama.checkpoint import CheckpointError
from llama.loading import open_checkpoint
from llama.model import ModelArgs, Transformer
from llama.parallel import get_model_parallel_group, get_model_parallel_rank, get_model_parallel_world_size

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: Optional[str]) -> Optional[torch.dtype]:
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise ValueError(f"unknown --dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_model(ckpt_dir, tokenizer, seq_len: int, device: torch.device, dtype: Optional[str], method: str,
               fsdp: bool = False):
    """This model-parallel rank's model, loaded like ``Llama.build`` (meta device, then the rank's slices assigned).
    Returns (model, the checkpoint's params dict for writing Meta folders).

    ``dtype``: of the weights (default fp32, bf16 for a frozen LoRA base on CUDA). With ``fsdp`` the shards are
    always fp32 (AdamW's master weights) and ``dtype`` (default bf16 on CUDA) is the dtype they are gathered and
    computed in."""
    wanted = parse_dtype(dtype)
    if fsdp:
        base_dtype, compute_dtype = torch.float32, wanted or (torch.bfloat16 if device.type == "cuda" else None)
    else:
        base_dtype = wanted or (torch.bfloat16 if device.type == "cuda" and method in ("lora", "qlora")
                                else torch.float32)
    checkpoint = open_checkpoint(ckpt_dir)
    if tokenizer.n_words != checkpoint.vocab_size:
        raise CheckpointError(
            f"the tokenizer {tokenizer.model_path} has {tokenizer.n_words} pieces but {ckpt_dir} has "
            f"{checkpoint.vocab_size} embedding rows; pass the tokenizer this model was trained with")
    params = {**checkpoint.params, "max_seq_len": seq_len, "max_batch_size": 1, "vocab_size": checkpoint.vocab_size}
    model = Transformer(ModelArgs(**params), device="meta", dtype=base_dtype)
    state = checkpoint.local_state_dict(model.state_dict(), get_model_parallel_rank(),
                                        get_model_parallel_world_size())
    if fsdp:
        from kollama.train import fsdp as FS

        FS.shard_model(model, FS.data_parallel_mesh(device), compute_dtype)
        FS.load_shards(model, state, device)  # copy_ casts each shard to fp32 on the device
    else:
        # Full fine-tuning updates the tensors in place: copy them off the (memory-mapped) checkpoint.
        state = {k: v.to(device=device, dtype=base_dtype, copy=method == "full") for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
    model.init_buffers(device, base_dtype)  # rope table (and a 1-row KV cache the training forward never uses)
    model.requires_grad_(method == "full")
    if fsdp:
        FS.lazy_init(model, device)
    return model, dict(checkpoint.params)


def trainable_named_parameters(model) -> list:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters; check --method and --lora_targets")
    for _, p in named:  # optimizer state and updates in fp32 even over a bf16 base (autocast does the casting)
        if p.dtype != torch.float32:
            p.data = p.data.float()
    return named


# ---- QLoRA (--method qlora): NF4 base; see kollama/adapters/qlora.py ----
NF4_METRICS = ("bits_per_parameter", "expected_bits_per_parameter", "quantized_params", "stored_bytes",
               "dense_bytes", "max_abs_error", "rel_rms_error")


def load_qlora_model(ckpt_dir, tokenizer, seq_len: int, device: torch.device, dtype: Optional[str]):
    """This rank's model with every transformer-block linear in NF4 (embedding, norms and output dense).

    The checkpoint slices are opened on the CPU (memory-mapped, not copied) and each block linear's local shard
    is quantized straight onto ``device``, so on a GPU the dense block weights never arrive there (peak = NF4
    model + one dense layer). Quantization is deterministic, which keeps --resume exact without saving the
    NF4 buffers. Returns (model, checkpoint params, NF4 report; counts summed over the model-parallel group)."""
    if dtype is None and device.type == "cuda":
        dtype = "bfloat16"  # compute dtype of the dense parts and of dequantized weights under autocast
    model, params = load_model(ckpt_dir, tokenizer, seq_len, torch.device("cpu"), dtype, "qlora")
    report = Q.quantize_base_nf4(model, device=device)
    if device.type != "cpu":
        with torch.no_grad():
            for p in model.parameters():  # what stayed dense: embedding, norms, output
                p.data = p.data.to(device)
        model.init_buffers(device, DTYPES[dtype])
    group = get_model_parallel_group()
    if group is not None:  # global figures: every rank quantized only its shard
        keys = ("quantized_params", "stored_bytes", "dense_bytes")  # "layers" is per rank: shards of the same ones
        totals = torch.tensor([float(report[k]) for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(totals, group=group)
        report.update({k: int(v) for k, v in zip(keys, totals.tolist())})
        worst = torch.tensor([report["max_abs_error"]], dtype=torch.float64, device=device)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
        report["max_abs_error"] = worst.item()
        report["bits_per_parameter"] = 8 * report["stored_bytes"] / report["quantized_params"]
        # the expected value and the relative RMS error stay this rank's (same shapes on every rank)
    return model, params, report
