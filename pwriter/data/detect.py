"""Filesystem detection (statfs, xattrs, ``lfs``): the I/O half of sizing.

Everything here asks the operating system about a path and returns plain
values (:class:`~pwriter.plan.sizing.FsInfo`) for the pure policy in
:mod:`pwriter.plan.sizing`.  The system calls are parameters, so tests (and the
``pwriter_fake_fs`` fixture) can pretend a path lives on Lustre or NFS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import struct
import subprocess
from collections.abc import Callable
from typing import NamedTuple

from ..plan.sizing import FsInfo, FsKind, fs_kind_from_magic

__all__ = ["StatfsResult", "detect_filesystem", "file_striping", "nearest_existing", "parse_lov_xattr", "statfs"]


class StatfsResult(NamedTuple):
    f_type: int
    f_bsize: int


class _Statfs(ctypes.Structure):
    # struct statfs on 64-bit Linux (bits/statfs.h): __fsword_t is a long.
    _fields_ = [
        ("f_type", ctypes.c_long),
        ("f_bsize", ctypes.c_long),
        ("f_blocks", ctypes.c_ulong),
        ("f_bfree", ctypes.c_ulong),
        ("f_bavail", ctypes.c_ulong),
        ("f_files", ctypes.c_ulong),
        ("f_ffree", ctypes.c_ulong),
        ("f_fsid", ctypes.c_int * 2),
        ("f_namelen", ctypes.c_long),
        ("f_frsize", ctypes.c_long),
        ("f_flags", ctypes.c_long),
        ("f_spare", ctypes.c_long * 4),
    ]


_libc: ctypes.CDLL | None = None


def statfs(path: str) -> StatfsResult:
    """Call statfs(2) on ``path``; raises OSError."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    buf = _Statfs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return StatfsResult(buf.f_type & 0xFFFFFFFF, buf.f_bsize)


def _climb(start: str, found: Callable[[str], bool]) -> str:
    """``start`` or its nearest parent for which ``found`` is true (else ``/``)."""
    current = start
    while not found(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


def nearest_existing(path: str) -> str:
    """``path`` made absolute, or its nearest parent that exists."""
    return _climb(os.path.abspath(path), os.path.exists)


def _mount_point(path: str) -> str:
    return _climb(os.path.realpath(path), os.path.ismount)


# lov_user_md v1 and v3 share their first 32 bytes:
#   u32 magic, u32 pattern, u64 object id, u64 object seq,
#   u32 stripe_size, u16 stripe_count, u16 stripe_offset
_LOV_MAGICS = (0x0BD10BD0, 0x0BD30BD0)
_LOV_HEAD = struct.Struct("<IIQQIHH")


def parse_lov_xattr(raw: bytes) -> tuple[int | None, int | None]:
    """Stripe size and count from a ``lustre.lov`` extended attribute.

    Returns ``(None, None)`` for layouts it does not decode (composite/PFL
    layouts); a stripe count of -1 ("all OSTs") is returned as ``None``.
    """
    if len(raw) < _LOV_HEAD.size:
        return None, None
    magic, _pattern, _oid, _seq, size, count, _offset = _LOV_HEAD.unpack_from(raw)
    if magic not in _LOV_MAGICS:
        return None, None
    return (size or None), (count if 0 < count < 0xFFFF else None)


def _lfs_getstripe(path: str, run: Callable[..., subprocess.CompletedProcess[str]]) -> tuple[int | None, int | None]:
    if shutil.which("lfs") is None:
        return None, None
    values: list[int | None] = []
    for flag in ("--stripe-size", "--stripe-count"):
        args = ["lfs", "getstripe", "-d", flag, path] if os.path.isdir(path) else ["lfs", "getstripe", flag, path]
        try:
            done = run(args, capture_output=True, text=True, timeout=10, check=False)
            number = int(done.stdout.split()[0])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            number = 0
        values.append(number if number > 0 else None)
    return values[0], values[1]


def file_striping(
    path: str,
    *,
    getxattr: Callable[[str, str], bytes] | None = None,
    run: Callable[..., subprocess.CompletedProcess[str]] | None = None,
) -> tuple[int | None, int | None]:
    """The Lustre stripe size and count of ``path`` (a file, or a directory's
    default): the ``lustre.lov`` extended attribute, else ``lfs getstripe``;
    ``(None, None)`` when neither tells."""
    try:
        size, count = parse_lov_xattr((getxattr or os.getxattr)(path, "lustre.lov"))
    except OSError:
        size = count = None
    if size is None:
        size, count = _lfs_getstripe(path, run or subprocess.run)
    return size, count


def detect_filesystem(
    path: str,
    *,
    statfs: Callable[[str], StatfsResult] | None = None,
    getxattr: Callable[[str, str], bytes] | None = None,
    run: Callable[..., subprocess.CompletedProcess[str]] | None = None,
) -> FsInfo:
    """Describe the filesystem that holds (or would hold) ``path``.

    Looks at ``path`` or its nearest existing parent.  On Lustre the stripe
    geometry comes from :func:`file_striping`, the OST count from ``lfs
    osts``, and how a layout can be set on create from
    :func:`pwriter.data.lustre.layout_setter`; on GPFS the stripe size is the
    block size.  Raises OSError only when statfs itself fails.  (The system
    calls default to this module's functions, looked up at call time.)
    """
    where = nearest_existing(path)
    result = (statfs or globals()["statfs"])(where)
    kind = fs_kind_from_magic(result.f_type)
    stripe_size: int | None = None
    stripe_count: int | None = None
    osts: int | None = None
    setter: str | None = None
    if kind is FsKind.LUSTRE:
        from .lustre import layout_setter, ost_count

        stripe_size, stripe_count = file_striping(where, getxattr=getxattr, run=run)
        osts = ost_count(where, run=run or subprocess.run)
        setter = layout_setter()
    elif kind is FsKind.GPFS and result.f_bsize > 0:
        stripe_size = result.f_bsize
    return FsInfo(
        kind=kind,
        magic=result.f_type,
        mount_point=_mount_point(where),
        block_size=result.f_bsize,
        stripe_size=stripe_size,
        stripe_count=stripe_count,
        ost_count=osts,
        layout_setter=setter,
    )
