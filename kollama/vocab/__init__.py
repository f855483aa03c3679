"""Korean vocabulary expansion: train a Korean SentencePiece BPE model, merge it into a Llama 2 tokenizer without
changing how that tokenizer splits non-Korean text, measure tokenizer efficiency, and grow a checkpoint's embeddings
to the merged tokenizer. ``python -m kollama.vocab train|merge|stats|resize`` (``__main__.py``).

  common.py   VocabError, Hangul, reading SentencePiece .model files (what the others share)
  corpus.py   reading text corpora (.txt, .jsonl) with file:line reports of skipped lines
  train.py    training a Korean BPE model with Llama 2's settings
  merge.py    appending the Korean pieces to a base tokenizer (and why non-Korean tokenization cannot change)
  stats.py    tokens per character / per Hangul syllable, byte-fallback share
  resize.py   growing tok_embeddings and output of a Meta checkpoint to the merged tokenizer
"""
