"""The kernel's TCMU generic-netlink family ``TCM-USER`` (docs/tcmu.md), over raw
``AF_NETLINK`` sockets.

The kernel multicasts ADDED_DEVICE / REMOVED_DEVICE / RECONFIG_DEVICE to the family's
``config`` group when a TCMU device is enabled, removed or has an attribute changed. A
handler that has sent ``SET_FEATURES(SUPP_KERN_CMD_REPLY=1)`` answers each with the
matching ``*_DONE`` message (a status, 0 or -errno, and the device id); the kernel then
fails the configfs write that caused the event with that status. Without that feature the
kernel does not wait.

Message layout: ``nlmsghdr`` (len u32, type u16, flags u16, seq u32, pid u32), then
``genlmsghdr`` (cmd u8, version u8, reserved u16), then attributes (len u16, type u16,
payload padded to 4 bytes).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from dataclasses import dataclass

from obd.errors import ObdError
from obd.serve.tcmu import uapi

NETLINK_GENERIC = 16
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4

GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
CTRL_ATTR_MCAST_GROUPS = 7
CTRL_ATTR_MCAST_GRP_NAME = 1
CTRL_ATTR_MCAST_GRP_ID = 2

FAMILY = uapi.TCMU_GENL_FAMILY
GROUP = uapi.TCMU_GENL_MCGRP
FAMILY_VERSION = uapi.TCMU_GENL_VERSION

NLMSGHDR = struct.Struct("=IHHII")
GENLMSGHDR = struct.Struct("=BBH")
NLATTR = struct.Struct("=HH")


class NetlinkError(ObdError):
    """A netlink call failed (exit code 3); the message names the call and the errno
    (EPERM: the TCMU family's commands need CAP_NET_ADMIN)."""

    exit_code = 3

    def __init__(self, err: int | None, message: str) -> None:
        self.errno = err or 0
        name = errno.errorcode.get(self.errno, "")
        super().__init__(f"{message} (errno {self.errno} {name})" if err else message)


def _align(n: int) -> int:
    return (n + 3) & ~3


def pack_attr(kind: int, payload: bytes) -> bytes:
    return NLATTR.pack(NLATTR.size + len(payload), kind) + payload.ljust(
        _align(len(payload)), b"\0"
    )


def parse_attrs(buf: bytes | memoryview) -> dict[int, bytes]:
    """type -> payload of each attribute in ``buf`` (the last one wins)."""
    out: dict[int, bytes] = {}
    pos = 0
    mv = memoryview(buf)
    while pos + NLATTR.size <= len(mv):
        length, kind = NLATTR.unpack_from(mv, pos)
        if length < NLATTR.size or pos + length > len(mv):
            break
        out[kind & 0x3FFF] = bytes(mv[pos + NLATTR.size : pos + length])
        pos += _align(length)
    return out


def _cstr(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode(errors="replace")


@dataclass(frozen=True)
class Message:
    """One generic-netlink message: header fields and its attributes."""

    type: int
    flags: int
    seq: int
    cmd: int
    attrs: dict[int, bytes]


def parse_messages(data: bytes) -> list[Message | int]:
    """The messages in one datagram; an NLMSG_ERROR becomes its (negative or 0) errno."""
    out: list[Message | int] = []
    pos = 0
    while pos + NLMSGHDR.size <= len(data):
        length, kind, flags, seq, _pid = NLMSGHDR.unpack_from(data, pos)
        if length < NLMSGHDR.size or pos + length > len(data):
            break
        body = data[pos + NLMSGHDR.size : pos + length]
        if kind == NLMSG_ERROR:
            out.append(struct.unpack_from("=i", body)[0])
        elif kind != NLMSG_DONE and len(body) >= GENLMSGHDR.size:
            cmd = body[0]
            out.append(Message(kind, flags, seq, cmd, parse_attrs(body[GENLMSGHDR.size :])))
        pos += _align(length)
    return out


@dataclass(frozen=True)
class DeviceEvent:
    """An ADDED / REMOVED / RECONFIG_DEVICE event from the kernel."""

    cmd: int
    device: str
    """The device's UIO name, ``tcm-user/<hba>/<dev>/<subtype>/<cfgstring>``."""
    minor: int
    """The UIO minor: the device is /dev/uio<minor>."""
    dev_id: int
    """The kernel's device index, echoed in the *_DONE reply."""
    dev_cfg: str | None = None
    dev_size: int | None = None
    writecache: int | None = None

    @classmethod
    def from_message(cls, m: Message) -> DeviceEvent:
        a = m.attrs

        def u32(k: int) -> int:
            return struct.unpack("=I", a[k][:4])[0] if k in a else -1

        return cls(
            cmd=m.cmd,
            device=_cstr(a.get(uapi.TCMU_ATTR_DEVICE, b"")),
            minor=u32(uapi.TCMU_ATTR_MINOR),
            dev_id=u32(uapi.TCMU_ATTR_DEVICE_ID),
            dev_cfg=_cstr(a[uapi.TCMU_ATTR_DEV_CFG]) if uapi.TCMU_ATTR_DEV_CFG in a else None,
            dev_size=struct.unpack("=Q", a[uapi.TCMU_ATTR_DEV_SIZE][:8])[0]
            if uapi.TCMU_ATTR_DEV_SIZE in a
            else None,
            writecache=a[uapi.TCMU_ATTR_WRITECACHE][0] if uapi.TCMU_ATTR_WRITECACHE in a else None,
        )


DONE_OF = {
    uapi.TCMU_CMD_ADDED_DEVICE: uapi.TCMU_CMD_ADDED_DEVICE_DONE,
    uapi.TCMU_CMD_REMOVED_DEVICE: uapi.TCMU_CMD_REMOVED_DEVICE_DONE,
    uapi.TCMU_CMD_RECONFIG_DEVICE: uapi.TCMU_CMD_RECONFIG_DEVICE_DONE,
}


def _socket() -> socket.socket:
    try:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        s.bind((0, 0))
    except OSError as e:
        raise NetlinkError(e.errno, f"netlink socket: {e.strerror}") from None
    return s


class TcmuNetlink:
    """Resolves the ``TCM-USER`` family, listens to its ``config`` group and sends replies.

    ``recv_event`` is called by one thread; ``reply`` and ``set_features`` may be called from
    any thread (they use their own socket under a lock).
    """

    def __init__(self) -> None:
        self._req = _socket()
        self._lock = threading.Lock()
        self._seq = 0
        self.family_id, groups = self._resolve()
        if GROUP not in groups:
            self._req.close()
            raise NetlinkError(errno.ENOENT, f"netlink family {FAMILY}: no {GROUP!r} group")
        self._events = _socket()
        try:
            self._events.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self._events.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, groups[GROUP])
        except OSError as e:
            self.close()
            raise NetlinkError(
                e.errno, f"netlink family {FAMILY}: joining group {GROUP}: {e.strerror}"
            ) from None

    # -- requests --------------------------------------------------------------------------
    def _request(self, kind: int, cmd: int, version: int, attrs: bytes, what: str) -> Message:
        with self._lock:
            self._seq += 1
            seq = self._seq
            body = GENLMSGHDR.pack(cmd, version, 0) + attrs
            hdr = NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0)
            try:
                self._req.send(hdr + body)
                reply: Message | None = None
                while True:
                    for m in parse_messages(self._req.recv(65536)):
                        if isinstance(m, int):
                            if m < 0:
                                raise NetlinkError(-m, f"netlink {what}: {os.strerror(-m)}")
                            return reply or Message(kind, 0, seq, cmd, {})
                        if m.seq == seq:
                            reply = m
            except NetlinkError:
                raise
            except OSError as e:
                raise NetlinkError(e.errno, f"netlink {what}: {e.strerror}") from None

    def _resolve(self) -> tuple[int, dict[str, int]]:
        try:
            m = self._request(
                GENL_ID_CTRL,
                CTRL_CMD_GETFAMILY,
                1,
                pack_attr(CTRL_ATTR_FAMILY_NAME, FAMILY.encode() + b"\0"),
                f"resolve family {FAMILY}",
            )
        except NetlinkError:
            self._req.close()
            raise
        if CTRL_ATTR_FAMILY_ID not in m.attrs:
            self._req.close()
            raise NetlinkError(errno.ENOENT, f"netlink family {FAMILY}: no id in the reply")
        fid = struct.unpack("=H", m.attrs[CTRL_ATTR_FAMILY_ID][:2])[0]
        groups: dict[str, int] = {}
        for nested in parse_attrs(m.attrs.get(CTRL_ATTR_MCAST_GROUPS, b"")).values():
            g = parse_attrs(nested)
            if CTRL_ATTR_MCAST_GRP_NAME in g and CTRL_ATTR_MCAST_GRP_ID in g:
                gid = struct.unpack("=I", g[CTRL_ATTR_MCAST_GRP_ID][:4])[0]
                groups[_cstr(g[CTRL_ATTR_MCAST_GRP_NAME])] = gid
        return fid, groups

    def set_features(self, cmd_reply: bool) -> None:
        """Tell the kernel whether it waits for *_DONE replies (a module-wide setting)."""
        self._request(
            self.family_id,
            uapi.TCMU_CMD_SET_FEATURES,
            FAMILY_VERSION,
            pack_attr(uapi.TCMU_ATTR_SUPP_KERN_CMD_REPLY, bytes([1 if cmd_reply else 0])),
            "SET_FEATURES",
        )

    def reply(self, event: DeviceEvent, status: int) -> None:
        """Send the *_DONE reply of ``event`` with ``status`` (0 or -errno)."""
        attrs = pack_attr(uapi.TCMU_ATTR_CMD_STATUS, struct.pack("=i", status)) + pack_attr(
            uapi.TCMU_ATTR_DEVICE_ID, struct.pack("=I", event.dev_id)
        )
        self._request(
            self.family_id, DONE_OF[event.cmd], FAMILY_VERSION, attrs, f"reply to {event.device}"
        )

    # -- events ----------------------------------------------------------------------------
    def fileno(self) -> int:
        return self._events.fileno()

    def recv_events(self, timeout: float | None = None) -> list[DeviceEvent]:
        """The device events of the next datagram ([] on timeout or for other messages)."""
        self._events.settimeout(timeout)
        try:
            data = self._events.recv(65536)
        except TimeoutError:
            return []
        except OSError as e:
            if e.errno == errno.ENOBUFS:  # events were dropped: the caller rescans
                raise NetlinkError(errno.ENOBUFS, "netlink events overflowed") from None
            raise NetlinkError(e.errno, f"netlink receive: {e.strerror}") from None
        out = []
        for m in parse_messages(data):
            if isinstance(m, Message) and m.type == self.family_id and m.cmd in DONE_OF:
                out.append(DeviceEvent.from_message(m))
        return out

    def close(self) -> None:
        for s in (getattr(self, "_events", None), self._req):
            if s is not None:
                s.close()


__all__ = ["DeviceEvent", "NetlinkError", "TcmuNetlink", "parse_attrs", "parse_messages"]
