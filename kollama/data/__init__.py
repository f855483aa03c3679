"""Training data.

  rows.py        readers (file:line errors, encodings), prompt templates and label masking, cutoff, packing, collate
  curriculum.py  translation instructions for a first curriculum stage; ``python -m kollama.curriculum``
"""
