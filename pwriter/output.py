"""Output names, temporary files and atomic publication.

An output name is only ever seen complete: data goes to temporary files
beside the targets, created exclusively (``O_EXCL``, so never through a
planted symlink).  Publication (:meth:`OutputSet.publish`) first writes and
fsyncs every small file (member index, manifest) to a temporary of its own,
keeps every file it will replace under a hard link, then renames everything
into place (a sharded set: shards, sidecars, then the manifest
``<output>.shards``, the commit point of the set) and fsyncs the directory.
A failure at any of these steps puts the previous files back.

Temporary names look like ``.<name>.pwriter-<host>-<pid>-<random>.tmp``:
hidden, recognisable, and never matching ``*.pfw`` or ``*.pfw.gz``.  A
process killed outright (SIGKILL, a node crash) leaves its temporaries
behind; the next output to the same name removes those whose process, on
this host, is gone (:func:`remove_stale_temporaries`), and ``merge -d``
never reads them.  A temporary gets the target's final permissions: those
of the file it replaces (``force``), else the umask's.

What a SIGKILL leaves, by the step it lands in:

* while writing, or while staging the small files and the kept links:
  temporaries only; every target holds its previous file (or is absent);
* during the renames of a one-file output: the data file is the old or the
  new one, whole (rename is atomic); a compressed output's member index
  may still be the previous one beside new data (it is renamed right after);
  the kept links of the old files are left as temporaries;
* during the renames of a sharded set: the manifest names the old set or the
  new one, and every shard it names is complete (new shards carry another
  generation name than the ones the old manifest lists); shards of the other
  set are left beside it, and removed by the next ``force`` output to that
  name;
* after the renames: the new output, and leftover temporaries.
"""

from __future__ import annotations

import errno
import functools
import os
import secrets
import stat as stat_module
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, TypeVar

from .errors import OutputExistsError, UsageError, WriteError

if TYPE_CHECKING:
    from .sizing import Striping

__all__ = ["OutputSet", "StreamOutput", "create_temporaries", "close_quietly", "shard_paths", "manifest_path",
           "member_index_path", "is_temporary_name", "remove_stale_temporaries", "write_fully", "TEMP_MARKER"]

TEMP_MARKER = ".pwriter-"
T = TypeVar("T")
_TRACE_SUFFIXES = (".pfw.gz", ".pfw", ".gz", ".json", ".jsonl", ".txt")


def member_index_path(target: str) -> str:
    """The member index of a compressed output: ``<target>.members.json``."""
    return target + ".members.json"


def manifest_path(target: str) -> str:
    """The manifest of a sharded output: ``<target>.shards``."""
    return target + ".shards"


def shard_paths(target: str, count: int, generation: int = 0) -> list[str]:
    """Shard names for ``target`` in read order: ``merged.pfw`` ->
    ``merged.shard_000.pfw``, ... (generation 1: ``merged.g1.shard_000.pfw``);
    the suffix is kept last so that tools that select ``*.pfw`` /
    ``*.pfw.gz`` still see every shard."""
    directory, name = os.path.split(target)
    for suffix in _TRACE_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            stem = name[: -len(suffix)]
            break
    else:
        stem, suffix = name, ""
    width = max(3, len(str(count - 1)))
    if generation:
        stem = f"{stem}.g{generation}"
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


def _at_fresh_name(target: str, make: Callable[[str], T]) -> tuple[str, T]:
    """``make(name)`` for a new temporary name of ``target``, drawing another
    name while ``make`` finds it taken (FileExistsError: a planted file or
    symlink, or another process's temporary); returns the name and what
    ``make`` returned."""
    for attempts_left in reversed(range(8)):
        name = _temporary_name(target)
        try:
            return name, make(name)
        except FileExistsError:
            if not attempts_left:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def close_quietly(fds: Iterable[int]) -> None:
    """Close every descriptor of ``fds``, whatever closing one of them says (cleanup paths)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _create_exclusively(target: str, create: Callable[[str], int] | None = None) -> tuple[str, int]:
    """A new temporary file beside ``target`` (never through an existing
    name or a planted symlink: ``O_EXCL``), with the target's final
    permissions; returns its name and descriptor.  ``create(name)`` makes
    and opens the file instead of ``open`` (a Lustre layout on create); it
    raises FileExistsError for a name that is taken."""
    try:
        mode: int | None = stat_module.S_IMODE(os.stat(target).st_mode)
    except OSError:
        mode = None
    temporary, fd = _at_fresh_name(
        target, create or (lambda name: os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)))
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


def create_temporaries(output: str, targets: Sequence[str], *, direct: bool = False,
                       striping: Striping | None = None, first: int = 0
                       ) -> tuple[list[str], list[int], list[int]]:
    """A temporary beside each of ``targets`` (files ``first``, ``first + 1``,
    ... of ``output``), created exclusively (:func:`_create_exclusively`),
    with ``striping``'s layout for that file number where given; returns the
    temporaries, their descriptors and (``direct``) their O_DIRECT
    descriptors.  On failure, removes what it created and raises
    :class:`WriteError` naming ``output`` (:class:`UsageError` where the
    filesystem refuses O_DIRECT)."""
    temporaries: list[str] = []
    fds: list[int] = []
    direct_fds: list[int] = []
    try:
        for index, target in enumerate(targets, start=first):
            create = None
            if striping is not None:
                from .lustre import create_striped

                offset = striping.offsets[index] if index < len(striping.offsets) else -1
                create = functools.partial(create_striped, stripe_count=striping.stripe_count,
                                           stripe_size=striping.stripe_size, offset=offset)
            temporary, fd = _create_exclusively(target, create)
            temporaries.append(temporary)
            fds.append(fd)
            if direct:
                direct_fds.append(os.open(temporary, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC))
    except OSError as exc:
        close_quietly(fds + direct_fds)
        for temporary in temporaries:
            _unlink_quietly(temporary)
        if direct and exc.errno == errno.EINVAL:
            raise UsageError(f"{output}: this filesystem does not support O_DIRECT (--direct)") from None
        layout = " with its Lustre layout" if striping is not None else ""
        raise WriteError(output, f"cannot create a temporary file{layout}: {exc.strerror or exc}",
                         exc.errno) from None
    return temporaries, fds, direct_fds


class OutputSet:
    """The files of one output: targets in read order, their temporaries, and
    (sharded) the manifest.  Created by :meth:`create`, finished by exactly
    one of :meth:`publish` or :meth:`discard`.

    A sharded output replacing another (``force``) gets shard names of
    another *generation* than the ones the current manifest lists
    (``merged.shard_000.pfw`` and ``merged.g1.shard_000.pfw`` alternate), so
    that a reader following the old manifest never sees a new shard.
    """

    def __init__(self, target: str, *, sharded: bool, files: int, force: bool, sidecars: Sequence[str] = ()) -> None:
        self.target = target
        self.sharded = sharded
        self.force = force
        self.manifest = manifest_path(target) if sharded else None
        self.targets = self._shard_generation(files) if sharded else [target]
        self.sidecars = list(sidecars)
        self.temporaries: list[str] = []
        self.fds: list[int] = []
        self.direct_fds: list[int] = []
        self.can_sync = True

    def _shard_generation(self, files: int) -> list[str]:
        """Shard names that the current manifest does not list (see the class docstring)."""
        assert self.manifest is not None
        listed = set(read_shard_set(self.manifest)) if self.force else set()
        for generation in range(len(listed) + 2):
            names = shard_paths(self.target, files, generation)
            if not listed.intersection(os.path.abspath(name) for name in names):
                return names
        raise AssertionError("unreachable: some generation is free")  # pragma: no cover

    @property
    def names(self) -> list[str]:
        """Every name this output will publish."""
        return self.targets + self.sidecars + ([self.manifest] if self.manifest else [])

    def check(self, inputs: Iterable[str] = ()) -> None:
        """Refuse, with :class:`UsageError`, a missing output directory, an
        existing output (without ``force``), an output that is one of
        ``inputs`` (same device and inode, whatever the path), and, even
        with ``force``, an output name that is not a regular file or a
        symlink to one (a directory, FIFO, socket, device, dangling link):
        replacing such a name with a file is never what was meant."""
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
                link = os.lstat(name)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise UsageError(f"{name}: cannot examine the output: {exc.strerror}") from None
            if _is_system_name(name):
                raise UsageError(f"{name}: the output is a device or process file (/dev, /proc); "
                                 "refusing to replace it (use -o - for standard output)")
            try:
                stat = os.stat(name)
            except OSError:
                raise UsageError(f"{name}: the output is a symlink to nothing; refusing to replace it") from None
            if not stat_module.S_ISREG(stat.st_mode):
                what = _kind_of(stat.st_mode)
                via = " (through a symlink)" if stat_module.S_ISLNK(link.st_mode) else ""
                raise UsageError(f"{name}: the output is {what}{via}, not a regular file; refusing to replace it")
            for path, input_stat in input_stats:
                if _same_file(stat, input_stat):
                    raise UsageError(f"{name}: the output is the input {path}")
            if not self.force:
                raise OutputExistsError(name, "output exists")

    def create(self, *, direct: bool = False, striping: Striping | None = None) -> list[int]:
        """Create the temporary files exclusively; returns their descriptors in read order.

        With ``direct``, each file also gets a second descriptor opened with
        O_DIRECT (:attr:`direct_fds`), for the writes that are aligned.
        With ``striping`` (Lustre), each file is created with that layout
        (:func:`pwriter.lustre.create_striped`); a layout that cannot be set
        is a :class:`WriteError` naming the file.
        """
        remove_stale_temporaries(self.names)
        self.temporaries, self.fds, self.direct_fds = create_temporaries(
            self.target, self.targets, direct=direct, striping=striping)
        return self.fds

    def close_files(self) -> None:
        close_quietly(self.fds + self.direct_fds)
        self.fds = []
        self.direct_fds = []

    def publish(self, *, fsync: bool, sidecars: dict[str, bytes] | None = None) -> None:
        """Put the (already written and, with ``fsync``, synced) temporaries
        in place, all or nothing.

        1. The ``sidecars`` (name -> content, e.g. the member index) and the
           manifest are written fully to temporaries of their own (and
           synced): every byte is on disk before the first rename.
        2. With ``force``, every existing target is kept by a hard link
           under a temporary name.
        3. Renames, in order: the data files (shards), the sidecars, the
           manifest last (the commit point of a sharded set); then the
           directory is synced.
        4. Only then are the kept links, and the shards of the replaced set
           (named by the old manifest), removed.

        Any failure in 1 to 3 puts every previous file back, byte for byte
        (the same inode), removes what was new, and raises
        :class:`WriteError` (or :class:`UsageError` for an output that
        appeared meanwhile without ``force``).
        """
        self.close_files()
        replaced_shards: list[str] = []
        if self.manifest and self.force:
            keep = {os.path.abspath(target) for target in self.targets}
            replaced_shards = [name for name in read_shard_set(self.manifest) if name not in keep]
        renames = list(zip(self.temporaries, self.targets))
        kept: dict[str, str] = {}  # target -> the temporary link that keeps its previous file
        published: list[str] = []
        try:
            smalls = dict(sidecars or {})
            if self.manifest:
                directory = os.path.dirname(os.path.abspath(self.manifest))
                smalls[self.manifest] = "".join(
                    os.path.relpath(target, directory) + "\n" for target in self.targets).encode()
            for name, content in smalls.items():
                renames.append((self._stage_small(name, content, fsync=fsync), name))
            if self.force:
                for _, target in renames:
                    if os.path.lexists(target):
                        kept[target] = self._keep(target)
            for temporary, target in renames:
                self._rename(temporary, target)
                published.append(target)
            if fsync:
                _fsync_directory(os.path.dirname(os.path.abspath(self.target)))
        except (OSError, UsageError) as exc:
            self._restore(published, kept, fsync=fsync)
            self.discard()
            if isinstance(exc, UsageError):
                raise
            what = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
            raise WriteError(self.target, f"cannot publish the output: {what}", exc.errno) from None
        self.temporaries = []
        for name in [*kept.values(), *replaced_shards]:
            _unlink_quietly(name)

    def _keep(self, target: str) -> str:
        """Keep ``target``'s current file (or symlink) under a new temporary name."""
        backup, _ = _at_fresh_name(target, lambda name: os.link(target, name, follow_symlinks=False))
        self.temporaries.append(backup)
        return backup

    def _restore(self, published: list[str], kept: dict[str, str], *, fsync: bool) -> None:
        """Undo a failed publish: each name gets back what it held before (best effort, never raises)."""
        for name in reversed(published):
            backup = kept.pop(name, None)
            try:
                if backup is not None:
                    os.replace(backup, name)
                else:
                    os.unlink(name)
            except OSError:
                pass
        if fsync:
            try:
                _fsync_directory(os.path.dirname(os.path.abspath(self.target)))
            except OSError:
                pass

    def _rename(self, temporary: str, target: str) -> None:
        if self.force:
            os.replace(temporary, target)
            return
        # Without force, never replace a file that appeared while we wrote.
        try:
            os.link(temporary, target)
        except FileExistsError:
            raise OutputExistsError(target, "output appeared while writing") from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            # no hard links here: fall back to a checked rename
            if os.path.lexists(target):
                raise OutputExistsError(target, "output appeared while writing") from None
            os.rename(temporary, target)
            return
        os.unlink(temporary)

    def _stage_small(self, name: str, content: bytes, *, fsync: bool) -> str:
        """Write a small file (manifest, index) fully to a temporary of its
        own (short writes resumed) and sync it; returns the temporary."""
        temporary, fd = _create_exclusively(name)
        self.temporaries.append(temporary)
        try:
            write_fully(fd, content)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        return temporary

    def discard(self) -> None:
        """Close and remove every temporary file; the targets are untouched."""
        self.close_files()
        for temporary in self.temporaries:
            _unlink_quietly(temporary)
        self.temporaries = []


class StreamOutput:
    """An output that is a stream (standard output, a pipe, an open file):
    the same interface as :class:`OutputSet`, for one file written in order.

    There is nothing to create, publish or discard: bytes written to a
    stream cannot be taken back.  The writer writes its chunks in offset
    order (at the stream's own position: ``offset`` -1 for the backend).
    """

    sharded = False
    manifest = None

    def __init__(self, stream: object) -> None:
        if stream == "-":
            fd, self.target = 1, "<stdout>"
        else:
            fd = stream.fileno()  # type: ignore[attr-defined]
            self.target = str(getattr(stream, "name", f"<fd {fd}>"))
            flush = getattr(stream, "flush", None)
            if flush is not None:
                flush()  # what the caller wrote to it before comes first
        self.targets = [self.target]
        self.fds = [fd]
        self.direct_fds: list[int] = []
        self.temporaries: list[str] = []
        mode = os.fstat(fd).st_mode
        self.can_sync = stat_module.S_ISREG(mode) or stat_module.S_ISBLK(mode)

    @property
    def names(self) -> list[str]:
        """No names: a stream publishes nothing."""
        return []

    def check(self, inputs: Iterable[str] = ()) -> None:
        """Nothing to check: a stream is always writable as it is."""

    def create(self, *, direct: bool = False, striping: Striping | None = None) -> list[int]:
        """The stream's descriptor (O_DIRECT is refused: a stream has no
        aligned offsets; a stream has no layout of ours to set)."""
        if direct:
            raise UsageError(f"{self.target}: --direct needs a file, not a stream")
        return self.fds

    def publish(self, *, fsync: bool, sidecars: dict[str, bytes] | None = None) -> None:
        """Nothing to publish: the bytes are already in the stream (no sidecars)."""

    def discard(self) -> None:
        """Nothing to discard: bytes written to a stream cannot be taken back."""


def write_fully(fd: int, content: bytes) -> None:
    """``os.write`` until every byte of ``content`` is written (short writes
    resumed, EINTR retried); a write of nothing is EIO, not a loop."""
    view = memoryview(content)
    while view:
        try:
            done = os.write(fd, view)
        except InterruptedError:
            continue
        if done == 0:
            raise OSError(errno.EIO, "a write wrote nothing")
        view = view[done:]


def _is_system_name(name: str) -> bool:
    """Whether ``name`` is, or leads through symlinks to, a name under /dev or
    /proc (``/dev/stdout`` -> ``/proc/self/fd/1`` -> whatever fd 1 is now);
    /dev/shm, a plain tmpfs, is not."""
    paths = [os.path.abspath(name), os.path.realpath(name)]
    if os.path.islink(name):
        paths.append(os.readlink(name))
    return any(path.startswith(("/dev/", "/proc/")) and not path.startswith("/dev/shm/") for path in paths)


def _kind_of(mode: int) -> str:
    kinds = ((stat_module.S_ISDIR, "a directory"), (stat_module.S_ISFIFO, "a FIFO"),
             (stat_module.S_ISSOCK, "a socket"), (stat_module.S_ISCHR, "a character device"),
             (stat_module.S_ISBLK, "a block device"))
    return next((what for test, what in kinds if test(mode)), "not a regular file")


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
