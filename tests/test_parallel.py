"""Model parallelism on 2 CPU processes (gloo): same logits, tokens and gradients as one process, for a
checkpoint of 1 shard and of 2 shards."""
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from helpers import free_port, random_model, save_meta, tiny_args, train_tiny_tokenizer
from llama import Llama
from llama.parallel import shard_dim_of
from mp_workers import PROMPTS, TOKENS, generation_worker


def test_two_processes_equal_one(tmp_path):
    args = tiny_args(dim=64, n_heads=8, n_kv_heads=4, vocab_size=128)
    model = random_model(args, seed=11, std=0.3)
    tok = str(train_tiny_tokenizer(tmp_path / "tok.model", vocab_size=128))
    ckpts = {"mp1": str(save_meta(model, tmp_path / "mp1", mp=1)), "mp2": str(save_meta(model, tmp_path / "mp2", mp=2))}

    mp.spawn(generation_worker, args=(2, free_port(), ckpts, tok, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    # The single-process reference, from the 2-shard checkpoint merged on load.
    single = Llama.build(ckpts["mp2"], tok, max_seq_len=32, max_batch_size=3, device="cpu")
    with torch.no_grad():
        ref_logits = single.model(TOKENS, 0)
    ref_greedy, _ = single.generate(PROMPTS, 8, temperature=0)
    ref_model = single.model.requires_grad_(True)
    F.cross_entropy(ref_model(TOKENS[:, :-1], 0, use_cache=False).flatten(0, 1), TOKENS[:, 1:].flatten()).backward()

    # Row-parallel layers sum partial products in another order (an all-reduce), so fp32 rounding differs by a
    # few tens of ulps of the largest logit; greedy tokens must still be identical.
    tolerance = 4e-6 * ref_logits.abs().max().item()
    for name in ckpts:
        r0, r1 = ranks[0][name], ranks[1][name]
        for rank, r in enumerate((r0, r1)):
            diff = (r["logits"] - ref_logits).abs().max().item()
            print(f"{name} checkpoint, rank {rank} of 2: max |logits - 1-process logits| = {diff:.2e}")
            assert diff <= tolerance, name
            assert r["greedy"] == ref_greedy, name
        assert r0["sampled"] == r1["sampled"], name  # rank 0 decided, rank 1 received
        for key, p in ref_model.named_parameters():
            dim = shard_dim_of(key)
            got = r0["grads"][key] if dim is None else torch.cat([r0["grads"][key], r1["grads"][key]], dim=dim)
            assert torch.allclose(got, p.grad, atol=1e-5, rtol=1e-4), (name, key)
