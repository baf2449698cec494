"""Runs a command in this process, after an experiment wrapper (``rerank_union.py``, ``rerank_mix.py``) patched the
functions it studies: ``-m MODULE ARGS...`` as ``python -m`` would, or ``SCRIPT ARGS...`` with the script's folder on
the path (as ``python SCRIPT`` would put it)."""

from __future__ import annotations

import os
import runpy
import sys


def run_command(argv: list[str]) -> None:
    if argv[0] == "-m":
        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
        runpy.run_path(argv[0], run_name="__main__")
