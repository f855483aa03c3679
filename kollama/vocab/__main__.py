"""``python -m kollama.vocab``: train, merge, stats and resize as subcommands (see ``--help``).

    python -m kollama.vocab train CORPUS [CORPUS ...] --out ko.model [--vocab_size 16000] [--field text]
    python -m kollama.vocab merge BASE.model KO.model OUT.model [--pad_multiple 64] [--model_parallel_size 1]
    python -m kollama.vocab stats TOKENIZER [TOKENIZER ...] --text FILE [--field text]
    python -m kollama.vocab resize CKPT_DIR NEW_TOKENIZER OUT_DIR [--old_tokenizer T]
"""
from typing import List, Optional

from kollama.vocab.merge import merge
from kollama.vocab.stats import stats, stats_table
from kollama.vocab.train import train
from llama.errors import run_cli


def _train_cli(*inputs, out, vocab_size: int = 16000, field: str = "text", character_coverage: float = 0.9995,
               max_lines: Optional[int] = None, num_threads: Optional[int] = None, overwrite: bool = False) -> None:
    """Train a Korean SentencePiece BPE model: train CORPUS... --out ko.model [--vocab_size N] [--field text]"""
    info = train(*inputs, out=out, vocab_size=vocab_size, field=field, character_coverage=character_coverage,
                 max_lines=max_lines, num_threads=num_threads, overwrite=overwrite)
    print(f"trained {info['out']}: {info['vocab_size']} pieces from {info['lines']} lines")


def _merge_cli(base, ko, out, pad_multiple: int = 64, model_parallel_size: int = 1, overwrite: bool = False) -> None:
    """Add the Korean pieces of KO.model to BASE.model: merge BASE.model KO.model OUT.model [--overwrite]"""
    info = merge(base, ko, out, pad_multiple, model_parallel_size, overwrite)
    skipped = ", ".join(f"{v} {k}" for k, v in info["skipped"].items() if v)
    print(f"added {info['added']} pieces to {info['base_size']} (+{info['padding']} padding): "
          f"final size {info['final_size']} -> {info['out']}" + (f" (skipped: {skipped})" if skipped else ""))


def _stats_cli(*tokenizers, text, field: str = "text", max_lines: Optional[int] = None) -> None:
    """Print a Markdown table of tokenizer efficiency: stats TOKENIZER... --text FILE [--field text]"""
    print(stats_table(stats(*tokenizers, text=text, field=field, max_lines=max_lines)))


def _resize_cli(ckpt_dir, new_tokenizer, out_dir, old_tokenizer=None, overwrite: bool = False) -> None:
    """Grow a checkpoint to an expanded tokenizer: resize CKPT_DIR NEW_TOKENIZER OUT_DIR [--old_tokenizer T]"""
    from kollama.vocab.resize import resize

    info = resize(ckpt_dir, new_tokenizer, out_dir, old_tokenizer=old_tokenizer, overwrite=overwrite)
    print(f"resized {info['old_vocab']} -> {info['new_vocab']} rows ({info['shards']} shard(s)): "
          f"{info['mean_of_pieces']} new rows from their old pieces, {info['global_mean']} from the global mean "
          f"-> {info['out']}")


def main(argv: Optional[List[str]] = None) -> None:
    run_cli({"train": _train_cli, "merge": _merge_cli, "stats": _stats_cli, "resize": _resize_cli}, argv,
            "python -m kollama.vocab")


if __name__ == "__main__":
    main()
