"""Output names, temporary files and atomic publication.

An output name is only ever seen complete: data goes to temporary files
beside the targets, created exclusively (``O_EXCL``, so never through a
planted symlink); publication fsyncs them (unless told not to), renames each
into place and fsyncs the directory.  A sharded output is published shard by
shard, then its manifest ``<output>.shards`` (the shard names in read order,
one per line) is published last: the manifest is the commit point of the set.

Temporary names look like ``.<name>.pwriter-<host>-<pid>-<random>.tmp``:
hidden, recognisable, and never matching ``*.pfw`` or ``*.pfw.gz``.  A
process killed outright (SIGKILL, a node crash) leaves its temporaries
behind; the next output to the same name removes those whose process, on
this host, is gone (:func:`remove_stale_temporaries`), and ``merge -d``
never reads them.  A temporary gets the target's final permissions: those
of the file it replaces (``force``), else the umask's.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat as stat_module
from collections.abc import Iterable, Sequence

from .errors import UsageError, WriteError

__all__ = ["OutputSet", "shard_paths", "manifest_path", "member_index_path", "is_temporary_name",
           "remove_stale_temporaries", "TEMP_MARKER"]

TEMP_MARKER = ".pwriter-"
_TRACE_SUFFIXES = (".pfw.gz", ".pfw", ".gz", ".json", ".jsonl", ".txt")


def member_index_path(target: str) -> str:
    """The member index of a compressed output: ``<target>.members.json``."""
    return target + ".members.json"


def manifest_path(target: str) -> str:
    """The manifest of a sharded output: ``<target>.shards``."""
    return target + ".shards"


def shard_paths(target: str, count: int) -> list[str]:
    """Shard names for ``target`` in read order: ``merged.pfw`` ->
    ``merged.shard_000.pfw``, ...; the suffix is kept last so that tools that
    select ``*.pfw`` / ``*.pfw.gz`` still see every shard."""
    directory, name = os.path.split(target)
    for suffix in _TRACE_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            stem = name[: -len(suffix)]
            break
    else:
        stem, suffix = name, ""
    width = max(3, len(str(count - 1)))
    return [os.path.join(directory, f"{stem}.shard_{index:0{width}d}{suffix}") for index in range(count)]


def is_temporary_name(name: str) -> bool:
    """Whether a file name is one of pwriter's temporary names."""
    base = os.path.basename(name)
    return base.startswith(".") and TEMP_MARKER in base and base.endswith(".tmp")


def _host() -> str:
    return os.uname().nodename.replace("/", "_") or "localhost"


def _temporary_name(target: str) -> str:
    directory, name = os.path.split(target)
    return os.path.join(directory, f".{name}{TEMP_MARKER}{_host()}-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _process_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists (EPERM: someone else's)
        return False
    return False


def remove_stale_temporaries(targets: Iterable[str]) -> list[str]:
    """Remove the temporaries of ``targets`` left by pwriter processes of
    this host that no longer run (killed before they could clean up);
    returns the names removed.  Temporaries of live processes and of other
    hosts (shared storage) are left alone.  Each directory is listed once."""
    prefixes: dict[str, list[str]] = {}  # directory -> the temporary-name prefixes of its targets
    for target in targets:
        directory, name = os.path.split(os.path.abspath(target))
        prefixes.setdefault(directory, []).append(f".{name}{TEMP_MARKER}{_host()}-")
    removed: list[str] = []
    for directory, wanted in prefixes.items():
        try:
            entries = os.listdir(directory)
        except OSError:
            continue
        for entry in entries:
            prefix = next((prefix for prefix in wanted if entry.startswith(prefix)), None)
            if prefix is None or not entry.endswith(".tmp"):
                continue
            pid, _, _ = entry[len(prefix) : -len(".tmp")].partition("-")
            if pid.isdigit() and int(pid) != os.getpid() and _process_is_gone(int(pid)):
                path = os.path.join(directory, entry)
                _unlink_quietly(path)
                removed.append(path)
    return removed


def _create_exclusively(target: str, flags: int = 0) -> tuple[str, int]:
    """A new temporary file beside ``target`` (never through an existing
    name or a planted symlink: ``O_EXCL``), with the target's final
    permissions; returns its name and descriptor."""
    try:
        mode: int | None = stat_module.S_IMODE(os.stat(target).st_mode)
    except OSError:
        mode = None
    for attempts_left in reversed(range(8)):  # a random name taken: take another
        temporary = _temporary_name(target)
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | flags, 0o666)
            break
        except FileExistsError:
            if not attempts_left:
                raise
    if mode is not None:
        try:
            os.fchmod(fd, mode)
        except OSError:
            os.close(fd)
            _unlink_quietly(temporary)
            raise
    return temporary, fd


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class OutputSet:
    """The files of one output: targets in read order, their temporaries, and
    (sharded) the manifest.  Created by :meth:`create`, finished by exactly
    one of :meth:`publish` or :meth:`discard`."""

    def __init__(self, target: str, *, sharded: bool, files: int, force: bool, sidecars: Sequence[str] = ()) -> None:
        self.target = target
        self.sharded = sharded
        self.force = force
        self.targets = shard_paths(target, files) if sharded else [target]
        self.manifest = manifest_path(target) if sharded else None
        self.sidecars = list(sidecars)
        self.temporaries: list[str] = []
        self.fds: list[int] = []
        self.direct_fds: list[int] = []

    @property
    def names(self) -> list[str]:
        """Every name this output will publish."""
        return self.targets + self.sidecars + ([self.manifest] if self.manifest else [])

    def check(self, inputs: Iterable[str] = ()) -> None:
        """Refuse, with :class:`UsageError`, a missing output directory, an
        existing output (without ``force``) and an output that is one of
        ``inputs`` (same device and inode, whatever the path)."""
        directory = os.path.dirname(os.path.abspath(self.target))
        if not os.path.isdir(directory):
            raise UsageError(f"{self.target}: output directory {directory} does not exist")
        input_stats = []
        for path in inputs:
            try:
                input_stats.append((path, os.stat(path)))
            except OSError:
                continue
        for name in self.names:
            try:
                stat = os.stat(name)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise UsageError(f"{name}: cannot examine the output: {exc.strerror}") from None
            for path, input_stat in input_stats:
                if _same_file(stat, input_stat):
                    raise UsageError(f"{name}: the output is the input {path}")
            if not self.force:
                raise UsageError(f"{name}: output exists (use --force to replace it)")

    def create(self, *, direct: bool = False) -> list[int]:
        """Create the temporary files exclusively; returns their descriptors in read order.

        With ``direct``, each file also gets a second descriptor opened with
        O_DIRECT (:attr:`direct_fds`), for the writes that are aligned.
        """
        remove_stale_temporaries(self.names)
        try:
            for target in self.targets:
                temporary, fd = _create_exclusively(target)
                self.temporaries.append(temporary)
                self.fds.append(fd)
                if direct:
                    self.direct_fds.append(os.open(temporary, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC))
        except OSError as exc:
            self.discard()
            if direct and exc.errno == errno.EINVAL:
                raise UsageError(f"{self.target}: this filesystem does not support O_DIRECT (--direct)") from None
            raise WriteError(self.target, f"cannot create a temporary file: {exc.strerror}", exc.errno) from None
        return self.fds

    def close_files(self) -> None:
        for fd in self.fds + self.direct_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []
        self.direct_fds = []

    def publish(self, *, fsync: bool, sidecars: dict[str, bytes] | None = None) -> None:
        """Rename the (already written and synced) temporaries into place.

        Then the ``sidecars`` (name -> content, e.g. the member index) are
        written and published.  Sharded: every shard, the sidecars, then the
        manifest.  A shard left from an earlier,
        larger set (named in the manifest being replaced) is removed after.
        """
        self.close_files()
        stale: list[str] = []
        if self.manifest and self.force:
            keep = {os.path.abspath(target) for target in self.targets}
            stale = [name for name in read_shard_set(self.manifest) if name not in keep]
        published: list[str] = []
        try:
            for temporary, target in zip(self.temporaries, self.targets):
                self._rename(temporary, target)
                published.append(target)
            for name, content in (sidecars or {}).items():
                self._write_small(name, content, fsync=fsync)
                published.append(name)
            if self.manifest:
                directory = os.path.dirname(os.path.abspath(self.manifest))
                text = "".join(os.path.relpath(target, directory) + "\n" for target in self.targets)
                self._write_small(self.manifest, text.encode(), fsync=fsync)
            if fsync:
                _fsync_directory(os.path.dirname(os.path.abspath(self.target)))
        except (OSError, UsageError) as exc:
            for name in published:
                _unlink_quietly(name)
            self.discard()
            if isinstance(exc, UsageError):
                raise
            raise WriteError(self.target, f"cannot publish the output: {exc.strerror}", exc.errno) from None
        self.temporaries = []
        for name in stale:
            _unlink_quietly(name)

    def _rename(self, temporary: str, target: str) -> None:
        if self.force:
            os.replace(temporary, target)
            return
        # Without --force, never replace a file that appeared while we wrote.
        try:
            os.link(temporary, target)
        except FileExistsError:
            raise UsageError(f"{target}: output appeared while writing (use --force to replace it)") from None
        except OSError:  # no hard links here: fall back to a checked rename
            if os.path.lexists(target):
                raise UsageError(f"{target}: output appeared while writing (use --force to replace it)") from None
            os.rename(temporary, target)
            return
        os.unlink(temporary)

    def _write_small(self, name: str, content: bytes, *, fsync: bool) -> None:
        """Publish a small file (manifest, index) through a temporary of its own."""
        temporary, fd = _create_exclusively(name)
        try:
            os.write(fd, content)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        self.temporaries.append(temporary)
        self._rename(temporary, name)

    def discard(self) -> None:
        """Close and remove every temporary file; the targets are untouched."""
        self.close_files()
        for temporary in self.temporaries:
            _unlink_quietly(temporary)
        self.temporaries = []


def read_shard_set(manifest: str) -> list[str]:
    """The shard paths a manifest lists, in read order."""
    directory = os.path.dirname(os.path.abspath(manifest))
    return [os.path.join(directory, name) for name in _read_manifest(manifest)]


def _read_manifest(manifest: str) -> Sequence[str]:
    try:
        with open(manifest, encoding="utf-8") as handle:
            return [line.strip() for line in handle if line.strip()]
    except OSError:
        return []


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
