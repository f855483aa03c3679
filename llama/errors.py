"""The project's error base class, and how command-line entry points report a user's mistake.

A ``UserError`` is a mistake in what the user gave (a path, a flag, a file's contents); its message names the problem
and the fix. Every error class of ``llama`` and ``kollama`` derives from it, and handlers catch ``UserError`` itself,
which lives in a module never run as ``__main__``: ``python -m kollama.curriculum`` runs kollama/curriculum.py under
the name ``__main__``, and a module run that way and also imported exists twice, so a handler written against a
class of the running module would miss the copy raised by the imported one.

Entry points run through ``run_cli`` (python-fire; it also refuses unknown commands and options before any work) or
under ``cli_errors()``: a UserError, or an OS error about a path the user named (missing, not a folder, no
permission), is printed as one line ``error: ...`` on stderr with exit code 2 and no traceback.
``--debug`` on any command line (or ``LLAMA_DEBUG=1`` in the environment) shows the traceback instead. Programming
errors are never caught.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, List, Optional, Tuple

DEBUG_ENV = "LLAMA_DEBUG"
PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)


class UserError(ValueError):
    """Bad input from the user; the message says what is wrong and how to fix it."""


def take_debug_flag(argv: Optional[List[str]] = None) -> Tuple[List[str], bool]:
    """``argv`` (default: sys.argv[1:]) without ``--debug``, and whether tracebacks were asked for."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    return [a for a in argv if a != "--debug"], debug


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (an OSError without a message keeps its errno text and file name)."""
    text = str(e) or type(e).__name__
    return " ".join(text.split())


@contextlib.contextmanager
def cli_errors(debug: bool = False) -> Iterator[None]:
    try:
        yield
    except (UserError,) + PATH_ERRORS as e:
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)


def check_options(fn, argv: List[str], where: str = "") -> None:
    """Refuse a ``--flag`` that ``fn`` does not take, before any work: fire would run ``fn`` with the flags it knows
    and only then complain about the rest (after minutes of generation or training)."""
    import inspect

    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return  # **options: the function validates the names itself
    for arg in argv:
        if arg == "--":  # what follows are fire's own flags
            break
        if not arg.startswith("--"):
            continue
        name = arg[2:].split("=", 1)[0].replace("-", "_")
        if name in params or name == "help" or (name.startswith("no") and name[2:] in params):  # fire's --noflag
            continue
        options = ", ".join("--" + n for n, p in params.items() if p.kind != p.VAR_POSITIONAL)
        raise UserError(f"unknown option --{name}{f' for {where}' if where else ''}; the options are {options}")


def run_cli(component, argv: Optional[List[str]] = None, name: Optional[str] = None, **fire_kwargs) -> None:
    """Run a python-fire command line (a function, or a dict of subcommand functions) by the project's rules:
    unknown commands and options are refused before any work, user errors print one line (``cli_errors``)."""
    import fire

    argv, debug = take_debug_flag(argv)
    with cli_errors(debug):
        fn, rest, where = component, argv, name or ""
        if isinstance(component, dict):
            fn = None
            if argv and not argv[0].startswith("-"):
                if argv[0] not in component:
                    raise UserError(f"unknown command {argv[0]!r}; the commands are {', '.join(component)}")
                fn, rest, where = component[argv[0]], argv[1:], argv[0]
        if fn is not None and "--help" not in rest and "-h" not in rest:
            check_options(fn, rest, where)
        fire.Fire(component, command=argv, name=name, **fire_kwargs)
