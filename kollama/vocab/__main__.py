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
    """Train a Korean SentencePiece BPE model: train CORPUS... --out ko.model [--vocab_size N] [--field text]

    Args:
        inputs (str): one or more corpus files, plain UTF-8 text (one sentence per line) or .jsonl/.ndjson (the
            string in --field of each object), e.g. ko_wiki.txt news.jsonl
        out (str): the SentencePiece .model to write (required), never one of the inputs, e.g. --out ko.model
        vocab_size (int, default 16000): pieces in the new model, at least 260 (3 control + 256 byte pieces +
            learned ones), e.g. --vocab_size 32000
        field (str, default "text"): the key holding the text in .jsonl/.ndjson inputs (plain text files ignore
            it), e.g. --field document
        character_coverage (float, default 0.9995): share of the corpus characters that get pieces of their own,
            the rarest rest go to byte fallback (0.9995 keeps the common Hangul syllables), e.g.
            --character_coverage 1.0
        max_lines (int, default None): read at most N usable lines from each input file; None reads them all,
            e.g. --max_lines 1000000
        num_threads (int, default None): SentencePiece trainer threads; None uses every CPU core, e.g.
            --num_threads 8
        overwrite (bool, default False): replace an existing --out (written atomically), e.g. --overwrite
    """
    info = train(*inputs, out=out, vocab_size=vocab_size, field=field, character_coverage=character_coverage,
                 max_lines=max_lines, num_threads=num_threads, overwrite=overwrite)
    print(f"trained {info['out']}: {info['vocab_size']} pieces from {info['lines']} lines")


def _merge_cli(base, ko, out, pad_multiple: int = 64, model_parallel_size: int = 1, overwrite: bool = False) -> None:
    """Add the Korean pieces of KO.model to BASE.model: merge BASE.model KO.model OUT.model [--overwrite]

    Args:
        base (str): the base SentencePiece BPE model, kept unchanged at ids 0..N-1, e.g. llama-2-7b/tokenizer.model
        ko (str): the Korean BPE model (from ``kollama.vocab train``); only its pieces with Hangul are added,
            e.g. ko.model
        out (str): the merged .model to write, never BASE or KO, e.g. merged.model
        pad_multiple (int, default 64): pad the vocabulary with UNUSED pieces up to a multiple of
            lcm(pad_multiple, model_parallel_size) (1 = no padding beyond that), e.g. --pad_multiple 128
        model_parallel_size (int, default 1): the shard count the resized checkpoint will use, so that its
            vocabulary splits evenly over the shards, e.g. --model_parallel_size 2
        overwrite (bool, default False): replace an existing OUT (written atomically), e.g. --overwrite
    """
    info = merge(base, ko, out, pad_multiple, model_parallel_size, overwrite)
    skipped = ", ".join(f"{v} {k}" for k, v in info["skipped"].items() if v)
    print(f"added {info['added']} pieces to {info['base_size']} (+{info['padding']} padding): "
          f"final size {info['final_size']} -> {info['out']}" + (f" (skipped: {skipped})" if skipped else ""))


def _stats_cli(*tokenizers, text, field: str = "text", max_lines: Optional[int] = None) -> None:
    """Print a Markdown table of tokenizer efficiency: stats TOKENIZER... --text FILE [--field text]

    Args:
        tokenizers (str): one or more SentencePiece .model files, one table row each, e.g. tokenizer.model
            merged.model
        text (str): the Korean text to encode (required), UTF-8 plain text (one line per text) or .jsonl/.ndjson,
            e.g. --text ko_dev.txt
        field (str, default "text"): the key holding the text in a .jsonl/.ndjson --text (plain text ignores it),
            e.g. --field document
        max_lines (int, default None): use only the first N usable lines of --text; None uses them all, e.g.
            --max_lines 5000
    """
    print(stats_table(stats(*tokenizers, text=text, field=field, max_lines=max_lines)))


def _resize_cli(ckpt_dir, new_tokenizer, out_dir, old_tokenizer=None, overwrite: bool = False) -> None:
    """Grow a checkpoint to an expanded tokenizer: resize CKPT_DIR NEW_TOKENIZER OUT_DIR [--old_tokenizer T]

    Args:
        ckpt_dir (str): the Meta folder to grow (params.json + consolidated.NN.pth or .safetensors, any shard
            count), e.g. llama-2-7b/
        new_tokenizer (str): the expanded .model (from ``kollama.vocab merge``) whose first pieces are the old
            tokenizer's, copied into OUT_DIR as tokenizer.model, e.g. merged.model
        out_dir (str): the Meta folder to write, with the same shard count and format, never inside CKPT_DIR, e.g.
            llama-2-7b-ko/
        old_tokenizer (str, default CKPT_DIR/tokenizer.model): the tokenizer the checkpoint was trained with, whose
            pieces split each new piece to initialize its row, e.g. --old_tokenizer llama-2-7b/tokenizer.model
        overwrite (bool, default False): replace an existing OUT_DIR once the new folder is complete, e.g.
            --overwrite
    """
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
