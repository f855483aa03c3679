"""Lossless speculative decoding: a cheap draft model proposes k tokens, the target checks them all in one forward.

Each round, for a batch of one row (rows would accept different numbers of tokens):
1. the draft, fed what it has not seen yet, proposes d1..dk one token at a time (its own sampler);
2. the target runs once over [the tokens it has not seen] + d1..dk, which gives its next-token distribution after
   every proposed prefix;
3. greedy (temperature 0): d_i is kept while it equals the target's argmax; the first mismatch is replaced by the
   target's token. Sampling: d_i is kept with probability min(1, p(d_i) / q(d_i)) (p: the target's sampling
   distribution, q: the draft's, both after temperature and top-p); the first rejected one is replaced by a draw
   from max(0, p - q) renormalised (Leviathan et al. 2023, Chen et al. 2023), so every emitted token is
   distributed exactly as the target alone would sample it. When all k are kept, the target's distribution after
   dk gives one more token for free.
4. Both KV caches roll back by position: the next forward simply starts where the accepted tokens end, so entries
   written for rejected proposals are overwritten before anything reads them (``KVCache``).
Greedy output therefore equals plain greedy decoding of the target (up to the summation order of a k+1-token
forward against one-token forwards, which can only matter at exact ties). The draft can be any model with the same
tokenizer -- a smaller Llama, or the target's own int8-quantized copy (``Llama.build(..., draft="int8")``: the same
weights, so most proposals are accepted, and int8 steps read a quarter of the bytes).
"""
from __future__ import annotations

import copy
from typing import Iterator, List, Optional

import torch

from llama.errors import UserError
from llama.model import Transformer
from llama.parallel import get_model_parallel_world_size
from llama.sampling import Sampler


def load_draft(draft: str, target: Transformer, tokenizer, tokenizer_path, max_seq_len: int, device) -> Transformer:
    """The draft model: "int8"/"int4" = a quantized copy of ``target``; otherwise a checkpoint folder (same
    tokenizer), loaded with a one-row KV cache."""
    if get_model_parallel_world_size() > 1:
        raise UserError("speculative decoding (draft=...) runs on one process; drop --draft under torchrun")
    from llama.quantize import QUANTIZERS, quantize_model

    if draft in QUANTIZERS:
        model = copy.deepcopy(target)
        return quantize_model(model, draft)
    from llama.loading import load_model

    return load_model(draft, tokenizer, tokenizer_path, max_seq_len, 1, device=device,
                      dtype=target.tok_embeddings.weight.dtype)


def speculative_tokens(target: Transformer, draft: Transformer, batch, sample: Sampler, eos_id: int,
                       k: int = 4, stats: Optional[dict] = None) -> Iterator[int]:
    """Fill ``batch`` (a ``TokenBatch`` of one row, no log-probabilities) like ``generate_tokens`` and yield each
    position once its token is written; several positions per round. ``stats`` (a dict) gets the counts
    "rounds", "proposed" and "accepted" added to it."""
    if batch.bsz != 1 or batch.logprobs:
        raise UserError("speculative decoding generates one row at a time, without log-probabilities")
    if k < 1:
        raise UserError(f"the number of proposed tokens k must be >= 1, got {k}")
    tokens = batch.tokens
    cur = batch.lengths[0]  # tokens[:, :cur] are known
    seen_target = seen_draft = 0  # positions whose keys/values each cache holds
    while cur < batch.total_len:
        n_prop = min(k, batch.total_len - cur)  # never write past the batch
        with torch.inference_mode():
            proposals, draft_probs, seen_draft = _propose(draft, tokens, cur, seen_draft, n_prop, sample)
            fed = torch.cat([tokens[:, seen_target:cur], proposals], dim=1)
            logits = _last_logits(target, fed, seen_target, n_prop + 1)[0]  # the target after each proposed prefix
            accepted, next_token = _verify(proposals[0], draft_probs, logits, sample)
        if stats is not None:
            for key, n in (("rounds", 1), ("proposed", n_prop), ("accepted", accepted)):
                stats[key] = stats.get(key, 0) + n
        new = proposals[0, :accepted].tolist() + [next_token]
        new = new[: batch.total_len - cur]
        tokens[0, cur:cur + len(new)] = torch.tensor(new, device=tokens.device)
        seen_target = cur + accepted  # the target's entries for the accepted proposals are right; the rest is stale
        seen_draft = min(seen_draft, cur + accepted)
        for i, t in enumerate(new):
            yield cur + i
            if t == eos_id or batch.any_stopped:
                return
        cur += len(new)


def _last_logits(model: Transformer, tokens: torch.Tensor, start_pos: int, m: int) -> torch.Tensor:
    """fp32 logits of the last ``m`` positions only (the output layer is the largest matmul of a small model)."""
    return model.output(model.hidden_states(tokens, start_pos)[:, -m:]).float()


def _propose(draft: Transformer, tokens: torch.Tensor, cur: int, seen: int, n: int, sample: Sampler):
    """n draft tokens after tokens[:, :cur] (the draft first catches up on tokens[:, seen:cur]); with sampling also
    the draft's distribution each was drawn from."""
    proposals: List[torch.Tensor] = []
    probs: List[torch.Tensor] = []
    feed, pos = tokens[:, seen:cur], seen
    for _ in range(n):
        logits = _last_logits(draft, feed, pos, 1)[:, -1]
        pos += feed.shape[1]
        if sample.temperature > 0:
            p = sample.distribution(logits)
            token = torch.multinomial(p, 1, generator=sample.generator)
            probs.append(p[0])
        else:
            token = logits.argmax(-1, keepdim=True)
        proposals.append(token)
        feed = token
    return torch.cat(proposals, dim=1), probs, pos


def _verify(proposals: torch.Tensor, draft_probs: List[torch.Tensor], logits: torch.Tensor, sample: Sampler):
    """(number of proposals kept, the token that follows them) from the target's logits after each prefix."""
    n = proposals.shape[0]
    if sample.temperature == 0:
        best = logits.argmax(-1)
        keep = (best[:n] == proposals).long().cumprod(0).sum().item()  # the longest agreeing prefix
        return keep, int(best[keep])
    p = sample.distribution(logits)  # (n + 1, vocab)
    u = torch.rand(n, generator=sample.generator, device=logits.device)
    for i in range(n):
        d = proposals[i]
        if u[i] * draft_probs[i][d] > p[i, d]:  # rejected with probability 1 - min(1, p / q)
            residual = (p[i] - draft_probs[i]).clamp_min(0)
            # residual sums to 0 only if p == q, where no proposal can be rejected; guard against rounding
            residual = residual if residual.sum() > 0 else p[i]
            return i, int(torch.multinomial(residual / residual.sum(), 1, generator=sample.generator))
    return n, int(torch.multinomial(p[n], 1, generator=sample.generator))
