"""Benchmark ``obd serve --nbd`` against qemu-nbd and nbdkit with nbdcopy (issue 5).

    python bench/serve.py [--size 1G] [--workdir DIR] [--keep] [--verify]

Builds, in the same run and from the same content:

* (a) a plain single LSMT layer (``obd create --from`` + ``obd commit``), served by obd;
  the raw file, served by ``qemu-nbd -f raw`` and ``nbdkit file``;
* (b) a 3-layer stack of ZFile(lz4) layers (``obd commit -z``), served by obd; the same
  content as a compressed qcow2 chain (``qemu-img convert -c`` with ``-B`` backing files),
  served by ``qemu-nbd``; and the merged raw file by ``qemu-nbd -f raw``.

Every server listens on 127.0.0.1. Each copy is ``nbdcopy URI null:`` (default request
size, several connections where the server allows multi-conn) and ``--request-size=4096``,
with a warm page cache (one untimed warm-up copy), best of ``--repeat`` runs. Prints
a table of MiB/s and ratios to qemu-nbd raw (a) and to the qcow2 chain (b).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def sh(*cmd: str, timeout: float = 1800) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")


def obd(*args: str) -> None:
    sh(sys.executable, "-m", "commands.main", *args)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().rstrip("B").rstrip("I")
    if t and t[-1] in units:
        return int(t[:-1]) * units[t[-1]]
    return int(t)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited early: {proc.args}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    sys.exit(f"server did not listen on {port}: {proc.args}")


# -- content ----------------------------------------------------------------------------


def chunk(seed: int, n: int) -> bytes:
    """Half random, half text: compresses about 2x, like a real root filesystem."""
    rnd = hashlib.sha256(seed.to_bytes(8, "little")).digest()
    text = (b"overlaybd block %08d " % seed) * (n // 2 // 23 + 1)
    return (os.urandom(n // 2 - 32) + rnd + text)[:n]


def make_content(work: Path, size: int) -> dict[str, Path]:
    base, d1, d2 = work / "base.raw", work / "diff1.raw", work / "diff2.raw"
    mid, merged = work / "mid.raw", work / "merged.raw"
    with open(base, "wb") as f:
        for i in range(size // MiB):
            f.write(chunk(i, MiB))
    # diff1: 1 MiB every 10 MiB; diff2: 256 KiB at +512 KiB every 7 MiB (sparse files).
    writes1 = [(off, chunk(10_000 + off // MiB, MiB)) for off in range(0, size, 10 * MiB)]
    writes2 = [(off + 512 * 1024, chunk(20_000 + off // MiB, 256 * 1024))
               for off in range(0, size - MiB, 7 * MiB)]  # fmt: skip
    for path, writes in ((d1, writes1), (d2, writes2)):
        with open(path, "wb") as f:
            f.truncate(size)
            for off, data in writes:
                f.seek(off)
                f.write(data)
    shutil.copyfile(base, mid)
    with open(mid, "r+b") as f:
        for off, data in writes1:
            f.seek(off)
            f.write(data)
    shutil.copyfile(mid, merged)
    with open(merged, "r+b") as f:
        for off, data in writes2:
            f.seek(off)
            f.write(data)
    return {"base": base, "diff1": d1, "diff2": d2, "mid": mid, "merged": merged}


def build(work: Path, size: int) -> dict[str, Path]:
    t0 = time.monotonic()
    raw = make_content(work, size)
    print(f"content: {time.monotonic() - t0:.1f} s", file=sys.stderr)
    t0 = time.monotonic()
    # (a) plain layer
    obd("create", "--from", str(raw["base"]), str(work / "p.data"), str(work / "p.index"))
    obd("commit", str(work / "p.data"), str(work / "p.index"), str(work / "plain.lsmt"))
    os.unlink(work / "p.data")
    (work / "plain.json").write_text('{"lowers": [{"file": "plain.lsmt"}]}')
    # (b) ZFile(lz4) stack
    for i, name in enumerate(("base", "diff1", "diff2")):
        d, x = work / f"l{i}.data", work / f"l{i}.index"
        obd("create", "--from", str(raw[name]), str(d), str(x))
        obd("commit", "-z", "--algorithm", "lz4", str(d), str(x), str(work / f"l{i}.zfile"))
        os.unlink(d)
    (work / "stack.json").write_text(
        '{"lowers": [{"file": "l0.zfile"}, {"file": "l1.zfile"}, {"file": "l2.zfile"}]}'
    )
    print(f"obd layers: {time.monotonic() - t0:.1f} s", file=sys.stderr)
    t0 = time.monotonic()
    # the same chain as compressed qcow2
    sh(
        "qemu-img",
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        str(raw["base"]),
        str(work / "q0.qcow2"),
    )
    sh("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-B", "q0.qcow2", "-F", "qcow2",
       str(raw["mid"]), str(work / "q1.qcow2"))  # fmt: skip
    sh("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-B", "q1.qcow2", "-F", "qcow2",
       str(raw["merged"]), str(work / "q2.qcow2"))  # fmt: skip
    print(f"qcow2 chain: {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return raw


# -- servers --------------------------------------------------------------------------------


class Server:
    def __init__(self, label: str, cmd: list[str], port: int, export: str = "", cwd: Path | None = None):  # fmt: skip
        self.label = label
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the server)
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self.log, stderr=self.log)
        try:
            wait_port(port, self.proc)
        except SystemExit:
            self.log.seek(0)
            sys.stderr.write(self.log.read().decode(errors="replace")[-2000:])
            raise
        self.uri = f"nbd://127.0.0.1:{port}/{export}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def obd_server(label: str, work: Path, config: str, workers: int = 0, exports: int = 1) -> Server:
    """``obd serve`` of ``config`` as export ``disk`` (and ``disk2``... when ``exports`` > 1)."""
    port = free_port()
    names = [f"{config}=disk"] + [f"{config}=disk{i}" for i in range(2, exports + 1)]
    cmd = [sys.executable, "-m", "commands.main", "serve", "--nbd", "--listen",
           f"127.0.0.1:{port}", "--workers", str(workers), *names]  # fmt: skip
    return Server(label, cmd, port, "disk", cwd=work)


def qemu_server(label: str, path: Path, fmt: str) -> Server:
    port = free_port()
    cmd = ["qemu-nbd", "-r", "-t", "-e", "16", "-f", fmt, "--bind", "127.0.0.1", "-p", str(port),
           "--cache=writeback", str(path)]  # fmt: skip
    return Server(label, cmd, port)


def nbdkit_server(label: str, path: Path) -> Server:
    port = free_port()
    cmd = ["nbdkit", "-r", "-f", "-i", "127.0.0.1", "-p", str(port), "file", str(path)]
    return Server(label, cmd, port)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# the server CPU seconds per GiB of the last copy_rate (the least of its timed runs):
# steadier than MiB/s on a busy machine, where other work takes the cores
LAST_CPU: list[float] = [0.0]


def copy_rate(uri: str, size: int, extra: list[str], repeat: int, pid: int = 0) -> float:
    """Best MiB/s of ``repeat`` timed ``nbdcopy`` runs after one warm-up."""
    best = 0.0
    cpu = float("inf")
    for i in range(repeat + 1):
        c0 = cpu_seconds(pid) if pid else 0.0
        t0 = time.perf_counter()
        sh("nbdcopy", *extra, uri, "null:")
        dt = time.perf_counter() - t0
        if i:
            best = max(best, size / MiB / dt)
            if pid:
                cpu = min(cpu, (cpu_seconds(pid) - c0) / (size / (1 << 30)))
    LAST_CPU[0] = cpu if pid else 0.0
    return best


def parallel_rate(uris: list[str], size: int, extra: list[str], repeat: int) -> float:
    """Best aggregate MiB/s of one ``nbdcopy`` per URI run at the same time."""
    best = 0.0
    for i in range(repeat + 1):
        t0 = time.perf_counter()
        procs = [subprocess.Popen(["nbdcopy", *extra, u, "null:"]) for u in uris]
        if any(p.wait() for p in procs):
            sys.exit(f"nbdcopy of {uris} failed")
        dt = time.perf_counter() - t0
        if i:
            best = max(best, len(uris) * size / MiB / dt)
    return best


def scaling(work: Path, size: int, repeat: int, workers: int) -> None:
    """1, 2 and 4 connections to one compressed export, and 2 exports read at once."""
    rows: list[tuple[str, list[float]]] = []
    conns = [1, 2, 4]
    srv = obd_server("obd", work, "stack.json", workers, exports=2)
    try:
        one = [copy_rate(srv.uri, size, [f"--connections={c}"], repeat) for c in conns]
        two = parallel_rate([srv.uri, srv.uri + "2"], size, ["--connections=1"], repeat)
    finally:
        srv.stop()
    rows.append(("obd 3 x ZFile(lz4) stack", [*one, two]))
    q1 = qemu_server("qcow2", work / "q2.qcow2", "qcow2")
    q2 = qemu_server("qcow2", work / "q2.qcow2", "qcow2")
    try:
        one = [copy_rate(q1.uri, size, [f"--connections={c}"], repeat) for c in conns]
        two = parallel_rate([q1.uri, q2.uri], size, ["--connections=1"], repeat)
    finally:
        q1.stop()
        q2.stop()
    rows.append(("qemu-nbd qcow2 -c chain", [*one, two]))
    print(f"\nscaling: nbdcopy of {size // MiB} MiB, MiB/s (x = to 1 connection), same run\n")
    print(f"{'server':<28} {'1 conn':>8} {'2 conns':>14} {'4 conns':>14} {'2 exports':>14}")
    for label, r in rows:
        cells = [f"{r[0]:8.0f}"] + [f"{v:8.0f} {v / r[0]:4.2f}x" for v in r[1:]]
        print(f"{label:<28} " + " ".join(f"{c:>14}" if i else c for i, c in enumerate(cells)))
    o, q = rows[0][1], rows[1][1]
    print("obd / qemu-nbd:             " + " ".join(f"{a / b:14.2f}" if i else f"{a / b:8.2f}"
                                                    for i, (a, b) in enumerate(zip(o, q, strict=True))))  # fmt: skip


def sha256_of_export(uri: str) -> str:
    p = subprocess.Popen(["nbdcopy", uri, "-"], stdout=subprocess.PIPE)
    h = hashlib.sha256()
    assert p.stdout is not None
    while data := p.stdout.read(4 * MiB):
        h.update(data)
    if p.wait():
        sys.exit(f"nbdcopy of {uri} failed")
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--size", default="1G")
    ap.add_argument("--workdir", help="where to build (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--reuse", action="store_true", help="reuse the files of a kept --workdir")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0, help="obd serve --workers")
    ap.add_argument("--verify", action="store_true", help="check every export's sha256")
    ap.add_argument("--scaling", action="store_true", help="also 1/2/4 connections, 2 exports")
    ap.add_argument("--only-scaling", action="store_true", help="only the scaling table")
    args = ap.parse_args()
    for tool in ("nbdcopy", "qemu-nbd", "qemu-img", "nbdkit"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (apt-get install qemu-utils libnbd-bin nbdkit)")
    size = parse_size(args.size)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="obd-bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        names = ("base", "diff1", "diff2", "mid", "merged")
        if args.reuse and (work / "q2.qcow2").exists():
            raw = {n: work / f"{n}.raw" for n in names}
        else:
            raw = build(work, size)
        for p in work.iterdir():  # warm the page cache
            if p.is_file():
                with open(p, "rb") as f:
                    while f.read(16 * MiB):
                        pass
        plan = [
            ("a", "obd plain LSMT layer", lambda: obd_server("obd", work, "plain.json", args.workers)),
            ("a", "qemu-nbd raw", lambda: qemu_server("qemu-nbd raw", raw["base"], "raw")),
            ("a", "nbdkit file", lambda: nbdkit_server("nbdkit file", raw["base"])),
            ("b", "obd 3 x ZFile(lz4) stack", lambda: obd_server("obd", work, "stack.json", args.workers)),
            ("b", "qemu-nbd qcow2 -c chain", lambda: qemu_server("qcow2", work / "q2.qcow2", "qcow2")),
            ("b", "qemu-nbd raw (merged)", lambda: qemu_server("raw", raw["merged"], "raw")),
        ]  # fmt: skip
        if args.scaling or args.only_scaling:
            scaling(work, size, args.repeat, args.workers)
        if args.only_scaling:
            return
        rows = []
        for case, label, start in plan:
            srv = start()
            try:
                if args.verify:
                    want = sha256_file(raw["base"] if case == "a" else raw["merged"])
                    got = sha256_of_export(srv.uri)
                    if got != want:
                        sys.exit(f"{label}: content differs ({got} != {want})")
                pid = srv.proc.pid
                big = copy_rate(srv.uri, size, [], args.repeat, pid)
                big_cpu = LAST_CPU[0]
                small = copy_rate(srv.uri, size, ["--request-size=4096"], args.repeat, pid)
                small_cpu = LAST_CPU[0]
            finally:
                srv.stop()
            rows.append((case, label, big, small, big_cpu, small_cpu))
            print(f"{label}: {big:.0f} MiB/s, 4 KiB: {small:.0f} MiB/s", file=sys.stderr)
        ref = {c: next(r for r in rows if r[0] == c and "qemu-nbd" in r[1]) for c in ("a", "b")}
        print(f"\nnbdcopy of {size // MiB} MiB to null:, warm cache, best of {args.repeat}\n")
        print(f"{'case':<4} {'server':<28} {'MiB/s':>8} {'ratio':>6} {'4K MiB/s':>9} {'4K req/s':>9} {'ratio':>6}"
              f" {'CPU s/GiB':>10} {'4K CPU s/GiB':>13}")  # fmt: skip
        for case, label, big, small, big_cpu, small_cpu in rows:
            r = ref[case]
            print(f"{case:<4} {label:<28} {big:8.0f} {big / max(r[2], 1e-9):6.2f} {small:9.0f} "
                  f"{small * 256:9.0f} {small / max(r[3], 1e-9):6.2f} {big_cpu:10.2f} {small_cpu:13.2f}")  # fmt: skip
        print("\nratios: (a) to qemu-nbd raw, (b) to the qemu-nbd qcow2 -c chain; CPU s/GiB: the")
        print("server's own CPU time per GiB served (steadier than MiB/s on a busy machine)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
