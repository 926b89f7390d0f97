"""Compile a checkout's modules to bytecode before its CLI is timed.

An installed package has its ``.pyc`` files written at install time; an editable
checkout run with ``PYTHONDONTWRITEBYTECODE=1`` (as on the machines these benches run
on) would compile every module at every start, and a short command would be timed
mostly compiling. ``compileall`` writes them whatever that variable says.
"""

from __future__ import annotations

import compileall
import os


def compile_checkout(repo: str) -> None:
    """Write the bytecode of ``repo``'s ``obd`` and ``commands`` packages."""
    for pkg in ("obd", "commands"):
        compileall.compile_dir(os.path.join(repo, pkg), quiet=1)
