"""Small helpers the command lines (run, eval, bench) share."""

from __future__ import annotations

import argparse
import os
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

    Checked before the slow work so that a run never ends in a traceback after its results:
    the parent folder is created when missing (as the writer would), then must be a writable
    folder. Returns a short reason for a one-line error."""
    parent = Path(value).expanduser().resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create {parent} ({exc.strerror or exc})"
    if not parent.is_dir():
        return f"{parent} is not a folder"
    if not os.access(parent, os.W_OK):
        return f"{parent} is not writable"
    if Path(value).expanduser().is_dir():
        return f"{value} is a folder, not a file"
    return None
