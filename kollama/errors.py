"""How command-line entry points report a user's mistake: one line ``error: ...`` on stderr and exit code 2, no
traceback (``KOLLAMA_DEBUG=1`` shows it). Programming errors still raise with their traceback."""
from __future__ import annotations

import contextlib
import os
import sys


def user_error_types() -> tuple:
    """The exceptions whose message is written for the user (each names the problem and the fix)."""
    from kollama.checkpointing import CheckpointSaveError, TrainingDiverged
    from kollama.data import DataError
    from kollama.fingerprint import FingerprintMismatch
    from kollama.pretrain import PretrainError
    from kollama.train.config import ConfigError
    from kollama.train.stages import CurriculumError
    from llama.checkpoint import CheckpointError

    types = [ConfigError, DataError, CurriculumError, PretrainError, CheckpointError, FingerprintMismatch,
             TrainingDiverged, CheckpointSaveError, FileNotFoundError]
    try:
        from kollama.fsdp import FSDPError

        types.append(FSDPError)
    except ImportError:  # FSDP needs a recent torch; without it there is no FSDPError to catch
        pass
    return tuple(types)


@contextlib.contextmanager
def exit_on_user_error():
    try:
        yield
    except user_error_types() as e:
        if os.environ.get("KOLLAMA_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
