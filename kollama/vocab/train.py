"""Train a Korean SentencePiece BPE model with Llama 2's settings: ``python -m kollama.vocab train``."""
import io
import os
from typing import Optional

import sentencepiece as spm

from kollama.vocab.common import PathLike, VocabError
from kollama.vocab.corpus import read_corpus
from llama.files import atomic_write_bytes, check_new_output

# Trainer settings copied from the Llama 2 tokenizer.model trainer_spec/normalizer_spec, so the Korean pieces are
# cut from text normalized exactly as Llama sees it (identity normalization, dummy prefix, spaces kept as they are).
LLAMA2_TRAINER_SETTINGS = dict(
    model_type="bpe", byte_fallback=True, split_digits=True, split_by_unicode_script=True, split_by_number=True,
    split_by_whitespace=True, treat_whitespace_as_suffix=False, allow_whitespace_only_pieces=True,
    max_sentencepiece_length=16, max_sentence_length=4192, normalization_rule_name="identity",
    add_dummy_prefix=True, remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    vocabulary_output_piece_score=True, hard_vocab_limit=True, shuffle_input_sentence=True,
)
# 3 control pieces (unk, bos, eos) + 256 byte pieces are always in the vocabulary; the rest are learned.
MIN_VOCAB_SIZE = 3 + 256 + 1


# ---------------------------------------------------------------------------------------------------- train

def train(*inputs: PathLike, out: PathLike, vocab_size: int = 16000, field: str = "text",
          character_coverage: float = 0.9995, max_lines: Optional[int] = None,
          num_threads: Optional[int] = None, overwrite: bool = False) -> dict:
    """Train a Korean SentencePiece BPE model (byte_fallback, Llama 2 normalization) on the given corpus files and
    write it atomically to `out`. character_coverage 0.9995 keeps the common Hangul syllables as pieces and leaves
    the rare ones (of 11,172 possible) to byte fallback. Returns {"out", "vocab_size", "lines"}. An existing
    ``out`` is replaced only with ``overwrite``, and never when it is one of the inputs."""
    check_new_output(out, "--out", inputs, overwrite)
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise VocabError(f"--vocab_size {vocab_size} is too small: it must be an integer >= {MIN_VOCAB_SIZE} "
                         f"(3 control pieces + 256 byte pieces + learned pieces); use e.g. 16000")
    lines = read_corpus(inputs, field, max_lines)
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=writer, vocab_size=vocab_size,
            character_coverage=character_coverage, num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2, **LLAMA2_TRAINER_SETTINGS)
    except RuntimeError as e:
        raise VocabError(_explain_trainer_error(str(e), vocab_size)) from e
    data = writer.getvalue()
    spm.SentencePieceProcessor(model_proto=data)  # never write a model that does not load
    atomic_write_bytes(out, data)
    return {"out": str(out), "vocab_size": vocab_size, "lines": len(lines)}


def _explain_trainer_error(msg: str, vocab_size: int) -> str:
    """Turn SentencePiece's internal check messages into what the user should change."""
    if "smaller than required_chars" in msg:
        need = msg.rsplit(" vs ", 1)[-1].split(".")[0]
        return (f"--vocab_size {vocab_size} is too small: the corpus characters plus control and byte pieces need "
                f"{need} pieces; raise --vocab_size well above {need} or lower --character_coverage")
    if "Vocabulary size too high" in msg:
        limit = msg.rsplit("<=", 1)[-1].strip(" .")
        return (f"--vocab_size {vocab_size} is too large for this corpus: only {limit} pieces can be learned from it; "
                f"lower --vocab_size to at most {limit} or add more text")
    return f"SentencePiece training failed: {msg}"
