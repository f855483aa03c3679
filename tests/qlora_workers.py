"""Functions run inside spawned processes by test_qlora.py (importable by name)."""
import torch
import torch.distributed as dist

from helpers import set_dist_env
from kollama.adapters.lora import load_adapter
from kollama.adapters.qlora import quantize_base_nf4
from llama.checkpoint import split_tensor
from llama.model import ModelArgs, Transformer
from llama.parallel import (ParallelLinear, destroy_model_parallel, get_model_parallel_group,
                            get_model_parallel_world_size, initialize_model_parallel)
from lora_workers import train_step


def gathered_dequantized(model):
    """Meta name -> the full weight as this model-parallel group sees it: every rank's dequantized NF4 shard,
    concatenated along the layer's shard dim (what a 1-process dense reference must hold to be equal)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, ParallelLinear) and m.weight is None:
            w = m.local_linear.dequantize(torch.float32)
            if get_model_parallel_world_size() > 1:
                parts = [torch.empty_like(w) for _ in range(get_model_parallel_world_size())]
                dist.all_gather(parts, w.contiguous(), group=get_model_parallel_group())
                w = torch.cat(parts, dim=m.shard_dim)
            out[name.replace(".base", "") + ".weight"] = w
    return out


def qlora_tp_worker(rank, world, port, base_path, adapter_dir, out_dir):
    torch.set_num_threads(1)  # two processes on two cores
    set_dist_env(rank, world, port)
    dist.init_process_group("gloo")
    initialize_model_parallel(world)
    try:
        saved = torch.load(base_path, weights_only=False)
        model = Transformer(ModelArgs(**saved["args"]))
        model.load_state_dict({k: split_tensor(k, v, world)[rank] for k, v in saved["state"].items()})
        report = quantize_base_nf4(model)  # on this rank's shard, after sharding (as the trainer does)
        model = load_adapter(model, adapter_dir)  # the single-process adapter, sliced for this rank
        result = dict(report=report, dequantized=gathered_dequantized(model))
        result.update(train_step(model))
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        destroy_model_parallel()
        dist.destroy_process_group()
