"""``python -m kollama.curriculum``: the command's entry point; the code is kollama/data/curriculum.py."""

if __name__ == "__main__":
    from kollama.data.curriculum import main

    main()
