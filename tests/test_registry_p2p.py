"""P2P (docs/formats.md §8.3): two ``obd serve`` processes read one image through a shared
proxy cache, the role a Dragonfly peer plays.

The proxy is Debian's nginx, started here as a prefix proxy (``<address>/<url>`` is
fetched from ``<url>``) with ``proxy_cache`` and the ``slice`` module for ranges. The
tests' counting fault proxy sits in front of the registry and shows what the registry
served: the second server fetches (almost) nothing from it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nbd_helpers import ServeProcess, require_tools, run
from tests.registry_helpers import fault_proxy, free_port, start_registry, stop_process
from tests.registry_images import Ext4Image, layered_ext4
from tests.test_registry_serve import global_config, push

NGINX = "/usr/sbin/nginx"
pytestmark = pytest.mark.timeout(240)


@contextlib.contextmanager
def nginx_p2p(folder: Path) -> Iterator[str]:
    """nginx as a caching prefix proxy on 127.0.0.1; yields its ``p2pConfig.address``."""
    if not os.path.exists(NGINX):
        pytest.skip("nginx not installed (apt-get install nginx)")
    folder.mkdir(parents=True)
    (folder / "cache").mkdir()
    port = free_port()
    conf = folder / "nginx.conf"
    conf.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
{"user root;" if os.geteuid() == 0 else ""}
events {{ worker_connections 256; }}
http {{
    access_log {folder}/access.log;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    proxy_cache_path {folder}/cache levels=1:2 keys_zone=p2p:8m max_size=1g inactive=1h use_temp_path=off;
    server {{
        listen 127.0.0.1:{port};
        merge_slashes off;
        location ~ ^/accelerator/(https?)://([^/]+)/(.*)$ {{
            slice 1m;
            proxy_cache p2p;
            proxy_cache_key $1://$2/$3$slice_range;
            proxy_set_header Range $slice_range;
            proxy_cache_valid 200 206 1h;
            proxy_cache_lock on;
            proxy_http_version 1.1;
            proxy_pass $1://$2/$3;
        }}
    }}
}}
""")
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        import socket
        import time

        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    pytest.skip(f"nginx did not start: {err.strip()[:300]}")
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/accelerator"
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def ext4_image(tmp_path_factory: pytest.TempPathFactory) -> Ext4Image:
    return layered_ext4(tmp_path_factory.mktemp("ext4"), size_mb=64, data_mb=8, seed=5)


def test_second_server_reads_through_the_p2p_proxy_not_the_registry(tmp_path: Path, ext4_image: Ext4Image) -> None:  # fmt: skip
    require_tools("nbdcopy")
    want = hashlib.sha256(ext4_image.raw.read_bytes()).hexdigest()
    with (
        start_registry(tmp_path / "registry") as reg,
        fault_proxy(reg) as counter,
        nginx_p2p(tmp_path / "nginx") as p2p,
    ):
        pushed = push(reg, ext4_image)
        blob_bytes = sum(size for _, size in pushed.layers)

        def serve_and_copy(name: str) -> int:
            folder = tmp_path / name
            folder.mkdir()
            cfg = global_config(folder, p2pConfig={"enable": True, "address": p2p})
            before = counter.bytes_served
            with ServeProcess(["--listen", "127.0.0.1:0", "--config", str(cfg), "--workers", "4", pushed.ref]) as sp:  # fmt: skip
                out = folder / "out.raw"
                run(["nbdcopy", sp.uri("ext4"), str(out)], timeout=120)
                assert hashlib.sha256(out.read_bytes()).hexdigest() == want
            return counter.bytes_served - before

        first = serve_and_copy("a")
        # the first one filled the proxy from the registry (whole 1 MiB slices, each once)
        assert blob_bytes * 0.9 <= first <= blob_bytes + len(pushed.layers) * (1 << 20)
        second = serve_and_copy("b")
        # the second one: the manifest and the size probes only
        assert second < blob_bytes * 0.02 + 16384, (first, second, blob_bytes)
        log = (tmp_path / "nginx" / "access.log").read_text()
        assert "/accelerator/http://" in log
