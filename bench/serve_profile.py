"""Where a served 4 KiB read spends its time: a per-request cost breakdown of ``obd serve``.

    python bench/serve_profile.py --workdir DIR [--tree OTHER_CHECKOUT ...] [--size 256M]

``DIR`` is a folder kept by ``bench/serve.py --keep`` (its ``stack.json``: three ZFile(lz4)
layers). For this checkout and every ``--tree`` (another checkout of obd, e.g. a
``git worktree`` of an older commit, to compare before and after), the script serves the
stack with that tree's code, samples the server with ``py-spy`` while one ``nbdcopy``
connection reads ``--size`` bytes in 4 KiB requests, and sorts every sample by the first
frame (from the innermost out) that falls in one of the stages below. It prints, per tree,
the wall time per request and the sampled time per request in each stage.

py-spy samples every thread that is running (not waiting): a decode that runs outside the
GIL on another thread is counted too, so the stages add up to CPU time, not wall time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from serve import free_port, wait_port  # bench/serve.py (run as python3 bench/serve_profile.py)

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20

# (stage, test on one frame "func (file:line)"), tried innermost frame first
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("pread of layer files", ("pread (", "preadv (", "readinto (")),
    ("socket recv", ("recv",)),
    ("send reply", ("send", "_reply")),
    ("decode + CRC", ("codecs.py", "zfile", "crc.py", "_zbatch")),
    ("index lookup, merged view", ("lsmt", "stack.py", "index.py")),
    ("request parse, dispatch", ("nbd",)),
]


def stage_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for stage, needles in STAGES:
            if any(n in frame for n in needles):
                return stage
    return "other"


def profile(tree: Path, work: Path, size: int, rate: int) -> tuple[float, Counter[str], int]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, "-m", "commands.main", "serve", "--nbd", "--listen",
           f"127.0.0.1:{port}", "stack.json=disk"]  # fmt: skip
    srv = subprocess.Popen(cmd, cwd=work, env=env, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, srv)
        uri = f"nbd://127.0.0.1:{port}/disk"
        copy = ["nbdcopy", "--connections=1", "--request-size=4096", uri, "null:"]
        subprocess.run(copy, check=True, timeout=600)  # warm-up
        with tempfile.NamedTemporaryFile(suffix=".txt") as out:
            spy = subprocess.Popen(
                [
                    "py-spy",
                    "record",
                    "--pid",
                    str(srv.pid),
                    "--rate",
                    str(rate),
                    "--format",
                    "raw",
                    "--threads",
                    "--nonblocking",
                    "-o",
                    out.name,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)  # py-spy attaches
            t0 = time.perf_counter()
            subprocess.run(copy, check=True, timeout=600)
            wall = time.perf_counter() - t0
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
            samples: Counter[str] = Counter()
            for line in Path(out.name).read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                if not count.isdigit():
                    continue
                samples[stage_of(stack.split(";"))] += int(count)
    finally:
        srv.send_signal(signal.SIGTERM)
        try:
            srv.wait(30)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait(5)
    return wall, samples, size // 4096


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--workdir", required=True, help="a folder kept by bench/serve.py --keep")
    ap.add_argument("--tree", action="append", default=[], help="another obd checkout")
    ap.add_argument("--size", type=int, default=256, help="MiB read per tree")
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    args = ap.parse_args()
    for tool in ("py-spy", "nbdcopy"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (pip install py-spy; apt-get install libnbd-bin)")
    work = Path(args.workdir)
    if not (work / "stack.json").exists():
        sys.exit(f"{work}: no stack.json (run bench/serve.py --workdir {work} --keep first)")
    trees = [Path(t).resolve() for t in args.tree] + [REPO]
    results = {t: profile(t, work, args.size * MiB, args.rate) for t in trees}
    stages = [s for s, _ in STAGES] + ["other"]
    print(f"\nobd serve, 3 x ZFile(lz4) stack, nbdcopy 1 connection, 4 KiB requests, "
          f"{args.size} MiB; µs per request\n")  # fmt: skip
    head = "".join(f"{t.name[:18]:>20}" for t in trees)
    print(f"{'stage':<28}{head}")
    walls = "".join(f"{w / n * 1e6:20.1f}" for w, _, n in results.values())
    print(f"{'wall time':<28}{walls}")
    for s in stages:
        row = "".join(f"{c[s] / args.rate / n * 1e6:20.1f}" for _, c, n in results.values())
        print(f"{'  ' + s:<28}{row}")
    tot = "".join(f"{sum(c.values()) / args.rate / n * 1e6:20.1f}" for _, c, n in results.values())
    print(f"{'  sampled, all stages':<28}{tot}")


if __name__ == "__main__":
    main()
