#!/usr/bin/env python3
"""Start-up cost of the ``obd`` CLI: wall time of short commands.

Not a test. Times ``obd --help``, ``obd --version``, ``obd zfile --help``, ``obd inspect``
of a small ZFile, ``obd zfile`` (compress), ``obd zfile -x`` (extract) and ``obd zfile
--verify`` of a 4 KiB file (the interpreter's start, imports, the work), beside a bare
``python3 -c pass``, as ``python -m commands.main ...`` run in the checkout the bench
lives in, and, with ``--before DIR``, in a second checkout (e.g. a worktree of an older
commit), the runs of both interleaved so machine noise falls on both. Each checkout's
``obd`` and ``commands`` are compiled to ``.pyc`` first (bench/pyc.py), as an installed
package is. Uses ``hyperfine`` when it is installed, else repeated subprocess runs (best
and median). It also lists which heavy modules (numpy, zstandard, lz4, httpx, rich, the
``crc32c`` package) each command imported. Target (issue 10): ``obd --help`` under 150 ms.

    python3 bench/startup.py [--before /work/wt/b-before] [--runs 15]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyc import compile_checkout  # bench/pyc.py

REPO = str(Path(__file__).resolve().parent.parent)
HEAVY = (
    "numpy",
    "zstandard",
    "lz4",
    "httpx",
    "rich",
    "crc32c",
    "obd.image",
    "obd.formats.lsmt",
)
BARE = ["-c", "pass"]  # the interpreter alone (site included), not obd
# Prints the heavy modules loaded once the command is done (runs it through main()).
PROBE = (
    "import sys, atexit\n"
    "heavy = {heavy!r}\n"
    "def _report():\n"
    "    got = sorted(h for h in heavy if h in sys.modules)\n"
    "    sys.stderr.write('HEAVY ' + ','.join(got) + '\\n')\n"
    "atexit.register(_report)\n"
    "sys.argv = ['obd'] + {argv!r}\n"
    "from commands.main import main\n"
    "main()\n"
)


def commands(folder: str) -> list[tuple[str, list[str]]]:
    small = os.path.join(folder, "small.bin")
    zsmall = os.path.join(folder, "small.zfile")
    out = os.path.join(folder, "out.zfile")
    plain = os.path.join(folder, "out.bin")
    return [
        ("python3 -c pass", BARE),
        ("obd --help", ["--help"]),
        ("obd --version", ["--version"]),
        ("obd zfile --help", ["zfile", "--help"]),
        ("obd inspect SMALL.zfile", ["inspect", zsmall]),
        ("obd zfile SMALL OUT", ["zfile", "-f", small, out]),
        ("obd zfile -x SMALL.zfile OUT", ["zfile", "-x", "-f", zsmall, plain]),
        ("obd zfile --verify SMALL.zfile", ["zfile", "--verify", zsmall]),
    ]


def argv_of(args: list[str]) -> list[str]:
    """The command line that runs ``obd ARGS`` (or, for BARE, the bare interpreter)."""
    return (
        [sys.executable, *args] if args is BARE else [sys.executable, "-m", "commands.main", *args]
    )


def prepare(folder: str) -> None:
    """A 4 KiB file, half text, half random, and its ZFile (made with this checkout)."""
    data = (b"overlaybd block device layer " * 80)[:2048] + os.urandom(2048)
    with open(os.path.join(folder, "small.bin"), "wb") as f:
        f.write(data)
    subprocess.run(
        [sys.executable, "-m", "commands.main", "zfile", "-f", "small.bin", "small.zfile"],
        cwd=folder,
        env={**os.environ, "PYTHONPATH": REPO},
        check=True,
    )


def run_once(tree: str, argv: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(
        argv_of(argv),
        cwd=tree,
        env={**os.environ, "PYTHONPATH": tree},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
    )
    return time.perf_counter() - t


def heavy_modules(tree: str, argv: list[str]) -> str:
    if argv is BARE:
        return "-"
    p = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY, argv=argv)],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": tree},
        capture_output=True,
        text=True,
    )
    for line in p.stderr.splitlines():
        if line.startswith("HEAVY "):
            return line[6:] or "-"
    return "?"


def hyperfine(trees: dict[str, str], argv: list[str], runs: int) -> dict[str, list[float]]:
    """Times per tree from hyperfine (one invocation per tree, warm-up 2)."""
    got: dict[str, list[float]] = {}
    for name, tree in trees.items():
        with tempfile.NamedTemporaryFile(suffix=".json") as js:
            cmd = " ".join(argv_of(argv))
            subprocess.run(
                ["hyperfine", "-N", "-w", "2", "-r", str(runs), "--export-json", js.name, cmd],
                cwd=tree,
                env={**os.environ, "PYTHONPATH": tree},
                stdout=subprocess.DEVNULL,
                check=True,
            )
            with open(js.name) as f:
                got[name] = json.load(f)["results"][0]["times"]
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", help="a second checkout to time beside this one")
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    trees = {"after": REPO}
    if args.before:
        trees = {"before": os.path.abspath(args.before), "after": REPO}
    for name, tree in trees.items():
        compile_checkout(tree)  # as an installed package has its .pyc
        where = subprocess.run(
            [sys.executable, "-c", "import obd; print(obd.__file__)"],
            cwd=tree,
            env={**os.environ, "PYTHONPATH": tree},
            capture_output=True,
            text=True,
        ).stdout.strip()
        print(f"{name}: {tree} (obd from {where}; obd and commands compiled to .pyc first)")
    folder = tempfile.mkdtemp(prefix="obd-startup-", dir=os.environ.get("OBD_BENCH_DIR"))
    use_hf = shutil.which("hyperfine") is not None
    try:
        prepare(folder)
        rows = []
        for label, argv in commands(folder):
            for tree in trees.values():
                run_once(tree, argv)  # warm the page cache and .pyc files
            if use_hf:
                times = hyperfine(trees, argv, args.runs)
            else:
                times = {name: [] for name in trees}
                for _ in range(args.runs):
                    for name, tree in trees.items():  # interleaved
                        times[name].append(run_once(tree, argv))
            heavy = {name: heavy_modules(tree, argv) for name, tree in trees.items()}
            rows.append((label, times, heavy))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(
        f"\nwall ms, {args.runs} runs each ({'hyperfine' if use_hf else 'subprocess'}"
        f"{', interleaved' if not use_hf and len(trees) > 1 else ''}); load average "
        f"{os.getloadavg()[0]:.1f}; target: obd --help < 150 ms"
    )
    head = f"{'command':32}"
    for name in trees:
        head += f" {name + ' best':>12} {name + ' median':>13}"
    if len(trees) > 1:
        head += f" {'after/before':>13}"
    print(head + "  heavy modules loaded")
    for label, times, heavy in rows:
        line = f"{label:32}"
        for name in trees:
            line += f" {min(times[name]) * 1e3:12.1f} {statistics.median(times[name]) * 1e3:13.1f}"
        if len(trees) > 1:
            ratio = statistics.median(times["after"]) / statistics.median(times["before"])
            line += f" {ratio:13.2f}"
        print(line + "  " + " | ".join(f"{n}: {h}" for n, h in heavy.items()))


if __name__ == "__main__":
    main()
