"""Continued pretraining helpers for ``kollama.train``: trainable sets and held-out bits per character.

Trainable sets (``--trainable``):
  lora              LoRA factors only (as ``--method lora``).
  lora+embeddings   LoRA factors + every row of ``tok_embeddings`` and ``output`` (Chinese-LLaMA's recipe after a
                    vocabulary expansion: the new rows must learn, the old ones may adapt). The LoRA adapter alone
                    does not carry the embeddings, so the run always writes ``merged/`` too.
  embeddings        ONLY the rows with id >= ``new_rows_from`` (the pieces a resize appended) of ``tok_embeddings``
                    and ``output``; every other weight is frozen. Old rows get an exactly zero gradient (a hook masks
                    them) and the two weights get no AdamW weight decay, so AdamW's update of an old row is 0 and
                    the row stays bit-identical.
  full              every weight (as ``--method full``).

Model parallelism: ``tok_embeddings`` is split on dim 1 (each rank holds every row, a slice of the columns), so its
local row i is global id i; ``output`` is split on dim 0, so local row i of rank r is global id r * V/M + i. The
mask is built from global ids (``row_mask``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from llama.errors import UserError
from llama.parallel import get_model_parallel_rank, get_model_parallel_world_size

log = logging.getLogger("kollama.train.pretrain")

TRAINABLE = ("lora", "lora+embeddings", "embeddings", "full")
TASKS = ("sft", "pretrain")
EMBEDDING_WEIGHTS = ("tok_embeddings", "output")


class PretrainError(UserError):
    """A usage problem with --task / --trainable / --heldout_text; the message says what to change."""


def resolve(trainable: Optional[str], method: str, merge: bool) -> Tuple[str, bool]:
    """(method, merge) the trainer must use for ``trainable``. ``None`` keeps --method as it is."""
    if trainable is None:
        return method, merge
    if trainable not in TRAINABLE:
        raise PretrainError(f"--trainable must be one of {', '.join(TRAINABLE)}, got {trainable!r}")
    if trainable in ("full", "embeddings"):
        if method not in ("lora", "full"):  # "lora" is --method's default, so it means "not given" here
            raise PretrainError(f"--trainable {trainable} needs a dense base; --method {method} cannot train it")
        return "full", False  # embeddings: loaded as for full fine-tuning, then all but two weights frozen
    if method == "full":
        raise PretrainError(f"--trainable {trainable} adds LoRA factors; drop --method full (or use --trainable full)")
    return method, merge or trainable == "lora+embeddings"


def new_rows_start(new_rows_from: Optional[int], ckpt_dir, vocab_size: int) -> int:
    """The first id the ``embeddings`` set trains: --new_rows_from, else ``old_vocab`` of ``resize_info.json`` in
    the checkpoint folder (save ``kollama.vocab.resize.resize``'s returned info there), else an error."""
    if new_rows_from is None:
        info = Path(str(ckpt_dir)) / "resize_info.json"
        if not info.is_file():
            raise PretrainError(f"--trainable embeddings trains only the rows a resize added: pass --new_rows_from N "
                                f"(N = the old vocabulary size) or put resize_info.json with old_vocab in {ckpt_dir}")
        new_rows_from = json.loads(info.read_text())["old_vocab"]
    n = int(new_rows_from)
    if not 0 < n < vocab_size:
        raise PretrainError(f"--new_rows_from {n} must be in (0, {vocab_size}) (the model has {vocab_size} rows)")
    return n


def _weight(model, name: str) -> torch.nn.Parameter:
    module = getattr(model, name)
    if hasattr(module, "lora_A"):  # kollama.adapters.lora.LoRALinear around output
        raise PretrainError(f"{name} is a LoRA target; drop it from --lora_targets to train its rows directly")
    return module.weight


def row_mask(name: str, local_rows: int, vocab_size: int, first_new: int) -> torch.Tensor:
    """(local_rows, 1) bool, True on the rows that must NOT change (global id < first_new)."""
    offset = 0
    if name == "output" and local_rows != vocab_size:  # split on dim 0 under model parallelism
        offset = get_model_parallel_rank() * local_rows
    ids = torch.arange(offset, offset + local_rows)
    return (ids < first_new)[:, None]


def set_trainable(model, trainable: Optional[str], new_rows_from: Optional[int] = None, ckpt_dir=None) -> dict:
    """Make ``model``'s parameters match ``trainable`` (after ``load_model`` / ``apply_lora``); returns a summary."""
    if trainable in (None, "lora", "full"):
        return {"trainable": trainable}
    vocab = model.params.vocab_size
    first_new = new_rows_start(new_rows_from, ckpt_dir, vocab) if trainable == "embeddings" else 0
    if trainable == "embeddings":
        model.requires_grad_(False)
    for name in EMBEDDING_WEIGHTS:
        w = _weight(model, name)
        # LoRA loads the base without copying (possibly memory-mapped); these rows are now updated in place.
        w.data = w.data.clone()
        w.requires_grad_(True)
        if first_new:
            mask = row_mask(name, w.shape[0], vocab, first_new).to(w.device)
            # masked_fill, not multiply: a NaN/inf gradient on an old row must not leak through either.
            w.register_hook(lambda g, m=mask: g.masked_fill(m, 0))
            w.no_weight_decay = True  # decay would shrink the frozen rows; read by the trainer's param groups
    if get_model_parallel_world_size() > 1:
        log.info("%s: row mask uses global ids (output rows offset by model-parallel rank)", trainable)
    return {"trainable": trainable, "new_rows_from": first_new}


RESUME_KEYS = ("task", "trainable", "new_rows_from")


def check_resume(path, config: dict) -> None:
    """Refuse to resume a checkpoint trained with another task / trainable set / row mask (checkpointing's
    MUST_MATCH predates these settings; a different mask would silently change which rows may move)."""
    state_file = Path(path) / "trainer_state.json"
    if not state_file.is_file():
        return  # load_trainer_state explains what is missing
    saved = json.loads(state_file.read_text()).get("config", {})
    diff = {k: (saved.get(k), config.get(k)) for k in RESUME_KEYS if k in saved and saved.get(k) != config.get(k)}
    if diff:
        raise ValueError(f"cannot resume from {path}: these settings differ from the checkpoint's (saved, now): "
                         f"{diff}; rerun with the saved values or start a new --out_dir")


def read_heldout(path, limit: Optional[int] = None) -> List[str]:
    """Documents of a held-out text: non-blank lines of a .txt, or the ``text`` field of a .jsonl."""
    from kollama.vocab.common import VocabError
    from kollama.vocab.corpus import read_corpus

    try:
        return read_corpus([str(path)], "text", limit)
    except VocabError as e:
        raise PretrainError(f"--heldout_text: {e}") from e


def heldout_bits_per_char(model, tokenizer, docs: Sequence[str], window: int, batch_size: int = 8,
                          autocast=None) -> float:
    """kollama.eval.evaluate.bits_per_char on ``docs`` in eval mode (no dropout, so no RNG draw: resume stays exact)."""
    from contextlib import nullcontext

    from kollama.eval.evaluate import bits_per_char

    was_training = model.training
    model.eval()
    try:
        with (autocast or nullcontext)():
            return bits_per_char(model, tokenizer, docs, window=window, batch_size=batch_size)["bits_per_char"]
    finally:
        model.train(was_training)
