"""Grow a Meta-layout checkpoint's vocabulary to an expanded tokenizer (``python -m kollama.vocab resize``).

Old rows of ``tok_embeddings`` and ``output`` are copied bit for bit, so the model's logits over old tokens for
old-token inputs do not change. A new piece starts from the mean of the rows of the pieces the *old* tokenizer
splits it into (for a Korean syllable under Llama 2, its UTF-8 byte pieces): it then begins close to what the model
already computes for that text, which trains faster than the global mean (the fallback for pieces that have no
text, such as the padding pieces ``merge`` appends).
It relies on what ``merge`` guarantees: ids 0..base_size-1 keep their pieces, Korean pieces are appended after
them, padding pieces are UNUSED.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import List, Optional

import torch
from sentencepiece import SentencePieceProcessor

from llama.checkpoint import MetaCheckpoint, read_slice, split_tensor, write_checkpoint
from kollama.vocab.common import VocabError, existing_file, load_model_proto

RESIZED = ("tok_embeddings.weight", "output.weight")


def _processor_without_dummy_prefix(path) -> SentencePieceProcessor:
    """The tokenizer with add_dummy_prefix off, so a piece's text is split as it stands (a piece without a leading
    '▁' is a word continuation; the normal encoder would prepend '▁' to it)."""
    proto = load_model_proto(path, "old tokenizer")
    proto.normalizer_spec.add_dummy_prefix = False
    sp = SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto.SerializeToString())
    return sp


def decompose_new_pieces(old_tokenizer, new_tokenizer) -> List[Optional[List[int]]]:
    """For every id past the old vocabulary, the old ids its text splits into (None: no text, use the mean)."""
    old = SentencePieceProcessor(model_file=str(old_tokenizer))
    new = SentencePieceProcessor(model_file=str(new_tokenizer))
    n_old = old.vocab_size()
    # Either file can be the wrong one, so both are named (resize has checked the old one against the checkpoint).
    if new.vocab_size() < n_old:
        raise VocabError(f"new tokenizer {new_tokenizer} has {new.vocab_size()} pieces, fewer than the {n_old} of "
                         f"the old tokenizer {old_tokenizer}; pass the merged tokenizer (from `kollama.vocab merge`) "
                         f"as NEW_TOKENIZER")
    for i in range(n_old):
        if old.id_to_piece(i) != new.id_to_piece(i):
            raise VocabError(
                f"id {i} is {old.id_to_piece(i)!r} in the old tokenizer {old_tokenizer} but {new.id_to_piece(i)!r} "
                f"in the new tokenizer {new_tokenizer}; resize needs a tokenizer that extends the old one (make it "
                f"with `kollama.vocab merge` from the old one)"
            )
    splitter = _processor_without_dummy_prefix(old_tokenizer)
    out = []
    for i in range(n_old, new.vocab_size()):
        if new.is_unused(i) or new.is_control(i) or new.is_unknown(i):
            out.append(None)
            continue
        ids = splitter.encode(new.id_to_piece(i).replace("▁", " "))
        out.append(ids or None)
    return out


def grow_rows(weight: torch.Tensor, new_rows: List[Optional[List[int]]]) -> torch.Tensor:
    """``weight`` (old_vocab, d) with one row appended per entry of ``new_rows``; means computed in fp32."""
    w32 = weight.float()
    fallback = w32.mean(dim=0)
    extra = [w32[ids].mean(dim=0) if ids else fallback for ids in new_rows]
    grown = torch.cat([w32, torch.stack(extra)]) if extra else w32
    out = grown.to(weight.dtype)
    out[: weight.shape[0]] = weight  # old rows stay bit-identical, whatever the dtype round trip did
    return out


def resize(ckpt_dir, new_tokenizer, out_dir, old_tokenizer=None, overwrite: bool = False) -> dict:
    """Write ``out_dir``: ``ckpt_dir`` with its vocabulary grown to ``new_tokenizer`` (same shard count/format)."""
    ckpt_dir = Path(str(ckpt_dir))
    new_tokenizer = existing_file(new_tokenizer, "new tokenizer")
    given = old_tokenizer is not None
    if not given:
        old_tokenizer = ckpt_dir / "tokenizer.model"
        if not old_tokenizer.is_file():
            raise VocabError(f"{ckpt_dir} holds no tokenizer.model; pass --old_tokenizer (the model's tokenizer)")
    old_tokenizer = Path(str(old_tokenizer))
    # Both files checked up front, the old one under the flag that chose it: SentencePiece's own errors name neither.
    load_model_proto(new_tokenizer, "new tokenizer")
    load_model_proto(old_tokenizer, "--old_tokenizer" if given else "old tokenizer")
    where = (f"--old_tokenizer {old_tokenizer}" if given
             else f"{old_tokenizer} (taken as the old tokenizer since --old_tokenizer was not given)")
    source = MetaCheckpoint(ckpt_dir)  # params.json checked against the shards' shapes
    params, readers = source.params, source.readers
    n_shards = len(readers)
    old_vocab = SentencePieceProcessor(model_file=str(old_tokenizer)).vocab_size()
    # The old tokenizer is checked against the checkpoint before the new one against it: when it is the wrong
    # one, the new tokenizer would otherwise be blamed for not extending it.
    full = {name: read_slice(readers, name, 0, 1) for name in RESIZED}
    for name, w in full.items():
        if w.shape[0] != old_vocab:
            raise VocabError(f"{name} of {ckpt_dir} has {w.shape[0]} rows but the old tokenizer has {old_vocab} "
                             f"pieces, so {where} is not the tokenizer this checkpoint was trained with; pass that "
                             f"one as --old_tokenizer")

    new_rows = decompose_new_pieces(old_tokenizer, new_tokenizer)
    grown = {name: split_tensor(name, grow_rows(full.pop(name), new_rows), n_shards) for name in RESIZED}
    new_vocab = old_vocab + len(new_rows)
    if params.get("vocab_size", -1) not in (-1, None):
        params = {**params, "vocab_size": new_vocab}

    def shard(rank):
        for name in readers[0].keys():
            yield name, grown[name][rank] if name in grown else read_slice(readers, name, rank, n_shards)

    fmt = "safetensors" if readers[0].path.suffix == ".safetensors" else "pth"
    from_text = sum(1 for r in new_rows if r)
    info = {"old_vocab": old_vocab, "new_vocab": new_vocab, "shards": n_shards,
            "mean_of_pieces": from_text, "global_mean": len(new_rows) - from_text}
    with tempfile.TemporaryDirectory() as staging:
        # The new tokenizer travels with the checkpoint under the name users expect, and resize_info.json tells
        # `kollama.train --trainable embeddings` where the new rows start; both inside the atomic write.
        tokenizer_copy = Path(staging) / "tokenizer.model"
        shutil.copyfile(new_tokenizer, tokenizer_copy)
        info_file = Path(staging) / "resize_info.json"
        info_file.write_text(json.dumps(info, indent=2) + "\n")
        write_checkpoint(out_dir, params, (shard(r) for r in range(n_shards)), fmt=fmt, overwrite=overwrite,
                         extra_files=[tokenizer_copy, info_file], sources=[ckpt_dir])
    return {**info, "out": str(out_dir)}
