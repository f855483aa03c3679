"""The update rule: the loss's normalisation, AdamW's parameter groups, and the learning-rate schedule.

Conventions (each one is tested against an independent computation in tests/test_train_numerics.py):
* Loss: the mean next-token cross-entropy over every target token of the optimizer step (all micro batches of all
  data-parallel ranks), so the update does not depend on how the step is split into micro batches. Each micro
  batch's summed loss is divided by the step's total target count before backward.
* Weight decay (decoupled, AdamW) on parameters with ndim >= 2 (linears, embeddings, LoRA A and B); never on 1-d
  parameters (RMSNorm weights) nor on embeddings whose old rows are frozen by a row mask (``no_weight_decay``).
* Schedule: step s (0-based) of the first ``warmup_steps`` trains at lr * (s + 1) / warmup_steps; then cosine from lr
  to lr * min_lr_ratio over the remaining steps. The lr is a pure function of the step (no scheduler state), so a
  resumed run may change --lr or the schedule's length and continues on the new curve.
"""
from __future__ import annotations

import math
from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F

from kollama.data.rows import IGNORE_INDEX


def token_loss(logits: torch.Tensor, labels: torch.Tensor, denominator: int) -> torch.Tensor:
    """Summed next-token cross-entropy over target tokens, divided by the optimizer step's target count.

    The labels are shifted, not the logits: slicing ``logits[:, :-1]`` would copy the (batch, seq, vocab) tensor
    and zero-fill a gradient of the same size (~8 % of a small model's step); the last position is ignored."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum") / denominator


def lr_lambda(warmup_steps: int, total_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """The factor of step (0-based): linear warmup (the first step already gets 1/warmup), then cosine to
    min_lr_ratio at the last step's end."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def param_groups(named: List[Tuple[str, torch.nn.Parameter]], weight_decay: float) -> List[dict]:
    """AdamW groups: decay on matrices, none on vectors (norms) or row-masked embeddings."""
    def decays(p) -> bool:
        return p.ndim >= 2 and not getattr(p, "no_weight_decay", False)

    return [{"params": [p for _, p in named if decays(p)], "weight_decay": weight_decay},
            {"params": [p for _, p in named if not decays(p)], "weight_decay": 0.0}]


def build_optimizer(named, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """torch's AdamW with its default betas (0.9, 0.999) and eps (1e-8)."""
    return torch.optim.AdamW(param_groups(named, weight_decay), lr=lr, foreach=device.type == "cuda", fused=False)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
