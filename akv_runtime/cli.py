"""Small helpers the command lines (run, eval, bench) share."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path


def positive_int(value: str) -> int:
    """argparse ``type`` for a positive integer (a one-line usage error otherwise)."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return n


def output_path_problem(value) -> str | None:
    """Why an output file (``--json``/``--plot``) could not be written, or None.

    Checked before the slow work so that a run never ends in a traceback after its results.
    The writers create the parent folder when they write, so the nearest existing ancestor
    of the file must be a folder where one can be created: a temporary file (or folder, when
    the parent is missing) is made there and removed at once. A permission test alone
    (``os.access``) passes for root on folders such as /proc, where creating fails. Returns a
    short reason for a one-line error."""
    path = Path(value).expanduser()
    if path.is_dir():
        return f"{value} is a folder, not a file"
    parent = path.resolve().parent
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK):
        return f"{existing} is not writable"
    try:
        if existing == parent:
            with tempfile.TemporaryFile(dir=existing):
                pass
        else:
            tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as exc:
        return f"cannot create files in {existing} ({exc.strerror or exc})"
    return None
