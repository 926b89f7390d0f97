"""``obd serve --nbd``: serve images as NBD exports until SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any

import click

from obd.errors import ObdError, UsageError


def _parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise click.BadParameter(f"{text!r} is not HOST:PORT", param_hint="--listen")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


@click.command(short_help="Serve images as block devices (NBD, TCMU).")
@click.option("--nbd", "nbd", is_flag=True, help="Serve the IMAGEs over NBD (the default).")
@click.option(
    "--tcmu",
    is_flag=True,
    help="Serve the kernel's TCMU devices of subtype overlaybd (as overlaybd-tcmu).",
)
@click.option(
    "--listen", metavar="HOST:PORT", help="TCP address (default 127.0.0.1:10809; port 0 picks one)."
)
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False),
    help="Unix socket path to listen on.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Global config (default /etc/overlaybd/overlaybd.json when present).",
)
@click.option("--pid-file", type=click.Path(dir_okay=False), help="Write the server's pid here.")
@click.option(
    "--workers",
    type=click.IntRange(0, 64),
    default=None,
    help="Worker threads per connection (0: the connection thread serves requests; "
    "default 0, or 8 when an image reads from a registry, so its fetches overlap).",
)
@click.option(
    "--metrics-listen",
    default="127.0.0.1",
    show_default=True,
    metavar="HOST",
    help="Address of the Prometheus exporter (port and path from exporterConfig).",
)
@click.option(
    "--plain-http",
    is_flag=True,
    help="Speak plain HTTP to the registry of an image reference (always so for localhost).",
)
@click.option(
    "--platform",
    metavar="OS/ARCH[/VARIANT]",
    help="Platform picked from an image index (default linux/amd64).",
)
@click.argument("images", nargs=-1, required=False, metavar="IMAGE[=NAME]...")
def serve(
    nbd: bool,
    tcmu: bool,
    listen: str | None,
    socket_path: str | None,
    config_path: str | None,
    pid_file: str | None,
    workers: int | None,
    metrics_listen: str,
    plain_http: bool,
    platform: str | None,
    images: tuple[str, ...],
) -> None:
    """Serve each IMAGE as an NBD export named NAME.

    IMAGE is an image config file (NAME defaults to the file's stem) or an image
    reference, HOST[:PORT]/REPO[:TAG] or HOST[:PORT]/REPO@sha256:..., whose overlaybd
    layers are read from the registry (NAME defaults to the last part of REPO). Layers
    that live only in a registry are read on demand through the cache of the global
    config (cacheConfig), with its credentials, certificates and P2P proxy.

    An image that cannot be opened fails its own export (its resultFile says why); the
    others are served. SIGTERM or SIGINT answers requests in flight, flushes writable
    images and exits 0; SIGHUP reopens the log files.

    With --tcmu, the TCMU devices configfs makes with dev_config=overlaybd/CONFIG (see
    obd attach) are served too, also those there at start; without target_core_user in
    the kernel it exits at once (3) saying how to load it.

    Exit codes: 0 stopped cleanly, 1 a flush failed at exit, 2 usage, 3 cannot listen,
    no image file or no TCMU in the kernel, 4 corrupt image, 6 not an overlaybd image,
    7 bad config, 8 the registry of an image reference failed.
    """
    from obd.serve import NbdService
    from obd.serve.config import DEFAULT_PATH, load_global_config

    tcp = _parse_listen(listen) if listen else None
    gcfg = load_global_config(config_path)
    use_files = config_path is not None or os.path.exists(DEFAULT_PATH)
    specs = [_spec(a) for a in images]
    # stderr stays at its level even when the log file wants INFO.
    root = logging.getLogger()
    for h in root.handlers:
        if h.level == logging.NOTSET:
            h.setLevel(root.level)

    if not specs and not tcmu:
        raise UsageError("nothing to serve: give IMAGE arguments, --tcmu, or both")
    tcmu_service = _tcmu_service(gcfg, use_files and not specs, workers or 0) if tcmu else None
    stop = threading.Event()
    service = (
        None
        if not specs
        else NbdService(
            specs,
            global_config=gcfg,
            use_log_files=use_files,
            tcp=tcp,
            unix=socket_path,
            workers=workers,
            metrics_host=metrics_listen,
            remote=_remote_factory(gcfg, plain_http),
            resolve=_resolver(platform),
        )
    )
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    hup = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: hup.set())
    try:
        try:
            addresses = service.start() if service else []
        except ObdError as e:
            # no image opened, and each export's failure is already a line on stderr
            ctx = click.get_current_context()
            statuses = service.statuses if service is not None else []
            logged = len(statuses) == len(specs) and not any(s.ok for s in statuses)
            if logged and not (ctx.obj or {}).get("debug"):
                sys.exit(e.exit_code)
            raise
        for st in service.statuses if service else []:
            if st.ok:
                mode = "read-only" if st.readonly else "writable"
                click.echo(
                    f"export {st.name}: {st.config_path} ({st.size} bytes, {mode})", err=True
                )
            else:
                click.echo(f"export {st.name}: failed:{st.reason} ({st.error})", err=True)
        for addr in addresses:
            click.echo(f"listening on {addr}", err=True)
        if tcmu_service is not None:
            tcmu_service.start()
            click.echo(f"tcmu: serving {len(tcmu_service.devices)} devices", err=True)
        sys.stderr.flush()
        if pid_file:
            _write_pid(pid_file)
        while not stop.wait(0.5):
            if hup.is_set():
                hup.clear()
                for svc in (service, tcmu_service):
                    if svc is not None:
                        svc.reopen_logs()
        failures = service.stop() if service else []
        failures += tcmu_service.stop() if tcmu_service else []
        if failures:
            name, err = failures[0]
            raise ObdError(f"export {name}: flush at exit failed: {err}")
        click.echo("stopped", err=True)
    finally:
        if service is not None:
            service.stop()
        if tcmu_service is not None:
            tcmu_service.stop()
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if pid_file:
            try:
                os.unlink(pid_file)
            except OSError:
                pass


def _spec(arg: str) -> Any:
    """An image config path, or an image reference (``REF`` or ``REF=NAME``)."""
    from obd.oci.reference import Reference, looks_like_reference
    from obd.serve import ImageSpec

    ref, _, name = arg.partition("=") if "=" in arg else (arg, "", "")
    if not os.path.exists(arg) and looks_like_reference(ref):
        Reference.parse(ref)  # a mistyped reference: its error, not "no such file"
        if not name:
            name = ref.split("@", 1)[0].rsplit("/", 1)[-1].split(":", 1)[0]
        return ImageSpec(ref, name, reference=True)
    return ImageSpec.parse(arg)


def _remote_factory(gcfg: Any, plain_http: bool) -> Any:
    def build(audit: Any) -> Any:
        from obd.registry.remote import RemoteContext

        return RemoteContext.from_config(gcfg, audit=audit, plain_http=plain_http or None)

    return build


def _resolver(platform: str | None) -> Any:
    def resolve(ref: str, remote: Any) -> Any:
        from obd.oci.manifest import resolve_image

        return resolve_image(remote.client, ref, platform=platform).config

    return resolve


def _tcmu_service(gcfg: Any, use_files: bool, workers: int) -> Any:
    """The TcmuService of ``--tcmu``; TcmuUnavailableError (exit 3) at once when the kernel
    has no target_core_user."""
    from obd.serve.tcmu.configfs import require_tcmu
    from obd.serve.tcmu.service import TcmuService

    require_tcmu()
    return TcmuService(global_config=gcfg, use_log_files=use_files, workers=workers)


def _write_pid(path: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(f"{os.getpid()}\n")
    except OSError as e:
        raise UsageError(f"cannot write pid file: {e.strerror or e}", path=path) from None
