"""``python -m kollama.train``: options from flags and an optional ``--config`` file (see ``--help``)."""
from __future__ import annotations

import logging
import os
import sys
from typing import List, Optional

from kollama.train.config import help_text
from llama.errors import run_cli


def run(**options) -> None:
    """Train with ``options``; print one summary line from rank 0."""
    from kollama.train.recipe import train

    s = train(config=options.pop("config", None), **options)
    if int(os.environ.get("RANK", "0")) == 0:
        last = s["loss"][-1][1] if s["loss"] else None
        dev = s["dev_loss"][-1][1] if s["dev_loss"] else None
        print(f"done: step {s['step']}/{s['total_steps']}, loss {last}, dev loss {dev}, outputs {s['outputs']}")


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return
    # Only rank 0 logs (data warnings, notices); the other ranks report errors only.
    level = logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.ERROR
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    run_cli(run, argv, "python -m kollama.train")


if __name__ == "__main__":
    main()
