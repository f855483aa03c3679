"""Evaluation and comparison of runs.

  evaluate.py  one evaluation command over Korean tasks: ``python -m kollama.evaluate``
  tasks.py     readers of the benchmark files and the prompts built from their rows
  report.py    the Markdown table and charts comparing runs: ``python -m kollama.report``
"""
