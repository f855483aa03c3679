"""``python -m kollama.evaluate``: the command's entry point; the code is kollama/eval/evaluate.py."""

if __name__ == "__main__":
    from kollama.eval.evaluate import main

    main()
