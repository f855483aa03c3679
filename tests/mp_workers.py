"""Functions run inside spawned processes by test_parallel.py (they must be importable by name)."""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from helpers import set_dist_env
from llama import Llama
from llama.parallel import destroy_model_parallel

PROMPTS = [[1, 5, 9, 11, 40, 7], [1, 77], [1, 3, 8, 100]]
TOKENS = torch.arange(2 * 9).reshape(2, 9) * 7 % 128


def generation_worker(rank, world, port, ckpt_dirs, tokenizer, out_dir):
    set_dist_env(rank, world, port)
    results = {}
    for name, ckpt in ckpt_dirs.items():
        # Different seeds per rank: equal sampled tokens prove that rank 0's choice is broadcast.
        llama = Llama.build(ckpt, tokenizer, max_seq_len=32, max_batch_size=3, device="cpu", seed=1 + rank)
        with torch.no_grad():
            logits = llama.model(TOKENS, 0)
        greedy, _ = llama.generate(PROMPTS, 8, temperature=0)
        sampled, _ = llama.generate(PROMPTS, 8, temperature=1.0, top_p=0.9)
        # One training step's gradients through the autograd-aware collectives (no KV cache).
        model = llama.model.requires_grad_(True)
        out = model(TOKENS[:, :-1], 0, use_cache=False)
        F.cross_entropy(out.flatten(0, 1), TOKENS[:, 1:].flatten()).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        results[name] = dict(logits=logits, greedy=greedy, sampled=sampled, grads=grads)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    destroy_model_parallel()
    dist.destroy_process_group()
