"""The next token from the logits: argmax at temperature 0, else top-p (nucleus) sampling of
softmax(logits / temperature) as in Meta's code, with a private generator so the global RNG is never touched."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.distributed as dist

from llama.errors import UserError
from llama.parallel import get_model_parallel_group, get_model_parallel_src_rank, get_model_parallel_world_size


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_sampling(temperature: float, top_p: float) -> None:
    """temperature: a finite number >= 0 (0 = greedy). top_p: in [0, 1] when sampling (0 keeps only the most
    likely token, as in Meta's sample_top_p); ignored at temperature 0, as Meta's code does."""
    if not _is_number(temperature) or not 0 <= temperature < math.inf:
        raise UserError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if temperature > 0 and (not _is_number(top_p) or not 0 <= top_p <= 1):
        raise UserError(f"top_p must be a number in [0, 1], got {top_p!r}")


def _top_p_sorted(probs: torch.Tensor, p: float):
    """(the kept probabilities in descending order, renormalised; their token ids): a token is dropped when the
    mass of the tokens ranked before it already exceeds p."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    probs_sort = probs_sort.masked_fill(probs_sum - probs_sort > p, 0.0)
    return probs_sort / probs_sort.sum(dim=-1, keepdim=True), probs_idx


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sample from the smallest set of most likely tokens whose mass reaches p (Meta's sample_top_p)."""
    probs_sort, probs_idx = _top_p_sorted(probs, p)
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


def top_p_distribution(probs: torch.Tensor, p: float) -> torch.Tensor:
    """The distribution ``sample_top_p`` draws from, in vocabulary order."""
    probs_sort, probs_idx = _top_p_sorted(probs, p)
    return torch.zeros_like(probs).scatter_(-1, probs_idx, probs_sort)


class Sampler:
    """Picks one token per row. Under model parallelism rank 0 of the group decides and the others receive its
    tokens, so every rank continues with the same ids whatever rounding its own logits had."""

    def __init__(self, temperature: float = 0.6, top_p: float = 0.9, generator: Optional[torch.Generator] = None):
        check_sampling(temperature, top_p)
        self.temperature, self.top_p, self.generator = temperature, top_p, generator

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """What ``__call__`` draws from at temperature > 0 (rows of probabilities over the vocabulary)."""
        return top_p_distribution(torch.softmax(logits / self.temperature, dim=-1), self.top_p)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature > 0:
            probs = torch.softmax(logits / self.temperature, dim=-1)
            next_token = sample_top_p(probs, self.top_p, self.generator)
        else:
            next_token = torch.argmax(logits, dim=-1)
        next_token = next_token.reshape(-1)
        if get_model_parallel_world_size() > 1:
            dist.broadcast(next_token, src=get_model_parallel_src_rank(), group=get_model_parallel_group())
        return next_token
