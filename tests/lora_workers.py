"""Functions run inside spawned processes by test_lora.py (importable by name), and the training step that the
single-process reference runs too, so both sides do exactly the same thing."""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from helpers import set_dist_env
from kollama.adapters.lora import (
    apply_lora,
    gather_lora_state_dict,
    load_adapter,
    lora_layers,
    merge_lora,
    save_adapter,
    trainable_parameters,
)
from llama.checkpoint import split_tensor
from llama.model import ModelArgs, Transformer
from llama.parallel import (
    destroy_model_parallel,
    get_model_parallel_group,
    get_model_parallel_world_size,
    initialize_model_parallel,
)

TOKENS = torch.arange(2 * 9).reshape(2, 9) * 7 % 128
TP_TARGETS = ("wq", "wo", "w1", "w2", "output")  # column, row, column, row, column with gather_output
TP_LORA = dict(r=4, alpha=8, dropout=0.0)
INIT_SEED = 123


def gathered_grads(model):
    """Full-size gradients of every LoRA factor (this rank's shards concatenated across the group)."""
    out = {}
    for path, m in lora_layers(model).items():
        for key, dim in m.shard_dims.items():
            g = getattr(m, key).grad.detach()
            if dim is not None and get_model_parallel_world_size() > 1:
                parts = [torch.empty_like(g) for _ in range(get_model_parallel_world_size())]
                dist.all_gather(parts, g.contiguous(), group=get_model_parallel_group())
                g = torch.cat(parts, dim=dim)
            out[f"{path}.{key}"] = g.clone()
    return out


def train_step(model, lr=1e-2):
    """Logits, full LoRA gradients and the full adapter after one AdamW step on TOKENS."""
    model.train()
    logits = model(TOKENS[:, :-1], 0, use_cache=False)
    F.cross_entropy(logits.flatten(0, 1), TOKENS[:, 1:].flatten()).backward()
    grads = gathered_grads(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    opt.step()
    return dict(logits=logits.detach(), grads=grads, after=gathered_lora(model))


def gathered_lora(model):
    return {k: v.clone() for k, v in gather_lora_state_dict(model).items()}


def lora_tp_worker(rank, world, port, base_path, adapter_dir, out_dir):
    set_dist_env(rank, world, port)
    dist.init_process_group("gloo")
    initialize_model_parallel(world)
    saved = torch.load(base_path, weights_only=False)
    args = ModelArgs(**saved["args"])

    def build():
        model = Transformer(args)
        model.load_state_dict({k: split_tensor(k, v, world)[rank] for k, v in saved["state"].items()})
        return model

    fresh = build()  # (building draws random weights; seed after it, as the single-process reference does)
    torch.manual_seed(INIT_SEED)  # every model-parallel rank seeded identically, as the trainer does
    fresh = apply_lora(fresh, TP_TARGETS, **TP_LORA)
    result = dict(init=gathered_lora(fresh), counts=trainable_parameters(fresh))

    model = load_adapter(build(), adapter_dir)  # a single-process adapter, sliced for this rank
    result.update(train_step(model))
    save_adapter(model, f"{out_dir}/mp_adapter", {"base_model": "tiny"})  # gathered, written by rank 0
    with torch.no_grad():
        model.eval()
        unmerged = model(TOKENS, 0, use_cache=False)
        merge_lora(model)
        result["merge_diff"] = (model(TOKENS, 0, use_cache=False) - unmerged).abs().max().item()
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    destroy_model_parallel()
    dist.destroy_process_group()
