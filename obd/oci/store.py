"""The local store of converted layers (``obd convert --store DIR``).

A converted layer is found by its key: the SHA-256 of the source layers' chain ID (the
digest chain of the OCI image-spec, as ACI's converter keys its layer cache) and of every
option that changes the bytes (algorithm, block size, virtual size, mkfs, flatten). Under
the store folder:

* ``layers/<key>.blob``: the converted layer (a tar-wrapped ZFile or LSMT file), written
  to a temporary name, fsynced and renamed into place by :func:`obd.image.ops.commit`;
* ``layers/<key>.json``: ``{"digest", "size", ...}``, written the same way, and only
  after the blob is complete; a layer is in the store once this record is there and the
  blob has its size. A crash leaves at most an unrecorded blob, replaced next time;
* ``layers/<key>.lock``: held (``flock``) while the layer is converted;
* ``tmp/convert-<pid>-*``: the writable layer of a conversion under way (sparse files,
  removed when the layer is committed or the conversion fails, in the background;
  :meth:`stale_scratch` names what a killed convert left, for the command line to
  remove).

The default folder is ``$XDG_CACHE_HOME/obd`` (``~/.cache/obd``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from obd.errors import FileAccessError
from obd.io.file import AtomicOutput, open_file


def default_store() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "obd")


@dataclass(frozen=True)
class StoredLayer:
    key: str
    path: str
    digest: str
    size: int
    record: dict[str, Any]


class LayerStore:
    def __init__(self, root: str) -> None:
        self.root = root
        self.layers = os.path.join(root, "layers")
        self.tmp = os.path.join(root, "tmp")
        self._cleanups: list[threading.Thread] = []
        try:
            os.makedirs(self.layers, exist_ok=True)
            os.makedirs(self.tmp, exist_ok=True)
        except OSError as e:
            raise FileAccessError(f"cannot make the store: {e.strerror or e}", path=root) from None

    @staticmethod
    def key(**facts: Any) -> str:
        """The key of a converted layer: the SHA-256 of ``facts`` as canonical JSON."""
        blob = json.dumps(facts, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Hold ``key`` while converting it: a second convert of the same layer (another
        process on this store) waits, then finds it stored. Without this, two converts
        would replace each other's blob between committing and recording it (a
        conversion's bytes differ from run to run: the ext4 has its own uuid and times)."""
        with open_file(os.path.join(self.layers, key + ".lock"), writable=True, create=True) as f:
            fcntl.flock(f.fd, fcntl.LOCK_EX)
            yield

    def blob_path(self, key: str) -> str:
        return os.path.join(self.layers, key + ".blob")

    def get(self, key: str) -> StoredLayer | None:
        """The stored layer of ``key``, or None when it is not (completely) there."""
        rec_path = os.path.join(self.layers, key + ".json")
        try:
            with open_file(rec_path) as f:
                rec = json.loads(f.pread(0, f.size()))
            size = os.path.getsize(self.blob_path(key))
        except (FileAccessError, OSError, ValueError):
            return None
        if not isinstance(rec, dict) or rec.get("size") != size or not rec.get("digest"):
            return None
        return StoredLayer(key, self.blob_path(key), rec["digest"], size, rec)

    def record(self, key: str, **extra: Any) -> StoredLayer:
        """Hash the blob committed at :meth:`blob_path` and record it: from now on it is in
        the store."""
        path = self.blob_path(key)
        try:
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
                size = f.tell()
        except OSError as e:
            raise FileAccessError(e.strerror or str(e), path=path) from None
        rec = {"digest": "sha256:" + digest, "size": size, **extra}
        with AtomicOutput(os.path.join(self.layers, key + ".json"), force=True) as out:
            out.pwrite(0, json.dumps(rec, sort_keys=True).encode())
        return StoredLayer(key, path, rec["digest"], size, rec)

    def _pushed_path(self, digest: str) -> str:
        return os.path.join(self.root, "pushed", digest.replace(":", "-") + ".json")

    def pushed_to(self, host: str, digest: str) -> list[str]:
        """Repositories of ``host`` this store pushed (or mounted) blob ``digest`` to."""
        try:
            with open_file(self._pushed_path(digest)) as f:
                doc = json.loads(f.pread(0, f.size()))
        except (FileAccessError, ValueError):
            return []
        repos = doc.get(host) if isinstance(doc, dict) else None
        return [r for r in repos if isinstance(r, str)] if isinstance(repos, list) else []

    def note_pushed(self, digest: str, host: str, repo: str) -> None:
        """Remember that ``host/repo`` holds blob ``digest`` (a later push to another
        repository of ``host`` mounts it from there instead of uploading it)."""
        path = self._pushed_path(digest)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        doc: dict[str, list[str]] = {}
        try:
            with open_file(path) as f:
                old = json.loads(f.pread(0, f.size()))
            if isinstance(old, dict):
                doc = {h: list(r) for h, r in old.items() if isinstance(r, list)}
        except (FileAccessError, ValueError):
            pass
        repos = doc.setdefault(host, [])
        if repo in repos:
            return
        repos.append(repo)
        with AtomicOutput(path, force=True) as out:
            out.pwrite(0, json.dumps(doc, sort_keys=True).encode())

    @contextlib.contextmanager
    def scratch(self) -> Iterator[str]:
        """A folder for one conversion's writable layer. It is removed afterwards in the
        background (freeing a sparse 64 GiB file can take seconds, e.g. on a filesystem
        mounted with ``discard``), while the next layer converts: :meth:`wait_scratch`
        waits for that. After a failure or an interrupt it is removed at once."""
        td = tempfile.TemporaryDirectory(prefix=f"convert-{os.getpid()}-", dir=self.tmp)
        try:
            yield td.name
        except BaseException:
            td.cleanup()  # the process may be about to exit: not in a daemon thread
            raise
        try:
            t = threading.Thread(target=td.cleanup, name="obd-scratch-cleanup", daemon=True)
            t.start()
            self._cleanups.append(t)
        except BaseException:  # an interrupt right here: no thread will remove it
            td.cleanup()
            raise

    def wait_scratch(self) -> None:
        """Wait for the background removals; an interrupt meanwhile is raised only once
        they are done (their threads are daemons: the exit would cut them short)."""
        interrupted: BaseException | None = None
        for t in self._cleanups:
            while t.is_alive():
                try:
                    t.join()
                except KeyboardInterrupt as e:
                    interrupted = e
        self._cleanups.clear()
        if interrupted is not None:
            raise interrupted

    def stale_scratch(self) -> list[str]:
        """Scratch folders whose process is gone (a convert killed mid-layer)."""
        stale = []
        for name in sorted(os.listdir(self.tmp)):
            parts = name.split("-")
            if len(parts) < 3 or parts[0] != "convert" or not parts[1].isdigit():
                continue
            if not os.path.exists(f"/proc/{parts[1]}"):
                stale.append(os.path.join(self.tmp, name))
        return stale
