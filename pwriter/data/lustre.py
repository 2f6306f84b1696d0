"""Lustre layouts on create: stripe a new file before its first byte.

Theory of operation
-------------------
A Lustre file's layout (stripe count, stripe size, first OST) is fixed once
its objects are allocated, that is at its first write; a file created the
ordinary way gets its directory's default, often a single stripe, and then
every writer of a large merge streams to one OST.  So pwriter creates each
temporary *with* its layout (the policy is :func:`pwriter.plan.sizing.plan_sizing`'s
``striping``), then opens it for writing:

* through liblustreapi's ``llapi_file_open``, which creates the file
  exclusively with the layout and returns its descriptor.  The library is
  loaded at run time with cffi's ABI mode: no header and no compiler are
  needed at install time, and the function's signature (plain integers) has
  been stable since Lustre 1.6;
* else with ``lfs setstripe -c COUNT -S SIZE [-i OST] FILE``, which creates
  the file with that layout (and refuses a file that exists), then
  ``open(O_WRONLY | O_NOFOLLOW)``.

Reading a layout back is :func:`pwriter.data.detect.file_striping`.  Every
command and library here is a parameter or looked up at call time, so that
tests can put a fake ``lfs`` on ``PATH``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

__all__ = ["create_striped", "layout_setter", "ost_count"]

LOV_PATTERN_RAID0 = 0x001
_api: Any = None  # the loaded liblustreapi (False once looked for and not found)


def _lustreapi() -> Any:
    """liblustreapi through cffi's ABI mode, or None where it is not installed."""
    global _api
    if _api is None:
        _api = False
        import cffi

        ffi = cffi.FFI()
        ffi.cdef("int llapi_file_open(const char *name, int flags, int mode, unsigned long long stripe_size, "
                 "int stripe_offset, int stripe_count, int stripe_pattern);")
        for name in ("liblustreapi.so.1", "liblustreapi.so"):
            try:
                _api = ffi.dlopen(name)
                break
            except OSError:
                continue
    return _api or None


def layout_setter() -> str | None:
    """How this machine can set a layout on create: ``"liblustreapi"``, ``"lfs"`` or None."""
    if _lustreapi() is not None:
        return "liblustreapi"
    return "lfs" if shutil.which("lfs") else None


def create_striped(path: str, *, stripe_count: int, stripe_size: int, offset: int = -1, mode: int = 0o666,
                   run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run) -> int:
    """Create ``path`` exclusively with the given layout and return a descriptor open for writing.

    ``stripe_count`` -1 stripes over every OST; ``offset`` is the first
    OST (-1: Lustre chooses).  Raises FileExistsError when ``path`` exists,
    OSError otherwise (from ``lfs``: its own message).
    """
    api = _lustreapi()
    if api is not None:
        fd = int(api.llapi_file_open(os.fsencode(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode,
                                     stripe_size, offset, stripe_count, LOV_PATTERN_RAID0))
        if fd < 0:
            raise OSError(-fd, os.strerror(-fd), path)
        return fd
    if os.path.lexists(path):
        raise FileExistsError(17, "File exists", path)
    args = ["lfs", "setstripe", "-c", str(stripe_count), "-S", str(stripe_size)]
    if offset >= 0:
        args += ["-i", str(offset)]
    try:
        done = run(args + [path], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise OSError(f"lfs setstripe: {exc}") from None
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        message = said[-1] if said else f"exit status {done.returncode}"
        if "exist" in message.lower():
            raise FileExistsError(17, message, path)
        raise OSError(f"lfs setstripe: {message}")
    return os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)


_OST_LINE = re.compile(r"^\s*\d+:\s+\S+")


def ost_count(path: str, *, run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run) -> int | None:
    """The number of OSTs of the Lustre filesystem holding ``path`` (``lfs osts``), or None."""
    if shutil.which("lfs") is None:
        return None
    try:
        done = run(["lfs", "osts", path], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    count = sum(1 for line in done.stdout.splitlines() if _OST_LINE.match(line))
    return count if done.returncode == 0 and count else None
