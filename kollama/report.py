"""``python -m kollama.report``: the command's entry point; the code is kollama/eval/report.py."""

if __name__ == "__main__":
    from kollama.eval.report import main

    main()
