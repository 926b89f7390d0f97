"""An NBD server for block devices (NetworkBlockDevice/nbd ``doc/proto.md``).

Fixed newstyle handshake only; options ``EXPORT_NAME``, ``ABORT``, ``LIST``, ``INFO``,
``GO``, ``STRUCTURED_REPLY``, ``LIST_META_CONTEXT`` and ``SET_META_CONTEXT`` (one
context, ``base:allocation``); commands ``READ``, ``WRITE`` (+``FUA``), ``FLUSH``,
``TRIM``, ``WRITE_ZEROES`` (+``NO_HOLE``), ``BLOCK_STATUS`` (+``REQ_ONE``) and ``DISC``.

- :mod:`~obd.serve.nbd.proto`: the wire constants and byte layouts, declared once;
- :mod:`~obd.serve.nbd.wire`: a connection's buffered socket (gathered replies);
- :mod:`~obd.serve.nbd.connection`: one client, handshake then transmission (threads,
  FLUSH and FUA);
- :mod:`~obd.serve.nbd.export`: an export and how device answers become NBD answers;
- :mod:`~obd.serve.nbd.server`: listeners, the accept loop and shutdown.

Every export of a server shares one device object between its connections. Its ``flush``
makes every completed write durable (the :class:`~obd.io.base.BlockDevice` contract),
which is what ``NBD_FLAG_CAN_MULTI_CONN`` asks for, so that flag is set unless an export
opts out.

Errors: a bad request gets the protocol's error reply (option data over 64 KiB gets
``NBD_REP_ERR_TOO_BIG``); a bad magic, unknown client flags, an oversized write (its
payload cannot be skipped safely), option data past 16 MiB or a dropped connection ends
that connection only. Nothing a client sends stops the server; running out of file
descriptors makes it wait before accepting again, serving the connections it has.
"""

from obd.serve.nbd.export import Export, ReadHook, block_status, flush_all
from obd.serve.nbd.proto import nbd_errno
from obd.serve.nbd.server import NbdServer

__all__ = ["Export", "NbdServer", "ReadHook", "block_status", "flush_all", "nbd_errno"]
