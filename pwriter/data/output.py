"""Outputs: what a writer writes to (the Output protocol, a file set, a stream), and a file set's atomic publication.

What an output name stands for
------------------------------
An output name ``merged.pfw`` stands for one *set* of files in its
directory: the data file ``merged.pfw`` (one-file layouts), the member
index ``merged.pfw.members.json`` (compressed), the manifest
``merged.pfw.shards`` (sharded) and the shards it lists
(``merged.shard_000.pfw`` or ``merged.g1.shard_000.pfw``, ...).  A reader
takes the manifest when there is one (it wins over a data file of the
same name), else the data file; a member index describes that set or is
absent, never another set's.

One run at a time
-----------------
A run holds the output's lock, ``.<name>.pwriter-lock`` beside it, from
:meth:`OutputSet.check` until it has published or failed
(:class:`OutputLock`): created with ``O_CREAT | O_EXCL`` (atomic on local
filesystems, NFSv3 and later, and Lustre; ``flock`` is not reliable across
NFS clients), holding ``host pid``.  A second run is refused
(:class:`UsageError`) naming the holder; a lock whose holder ran on this
host and is gone is taken over.  Like the temporaries, the lock is hidden
and never matches ``*.pfw`` or ``*.pfw.gz``.

Publishing
----------
Data goes to temporaries beside the targets, created exclusively
(``O_EXCL``: never through a planted symlink) with the target's final
permissions.  Every operation goes through a descriptor of the output's
directory, opened once: a directory renamed meanwhile still gets the whole
output or nothing.  :meth:`OutputSet.publish`

1. closes the data files, checking each close (NFS may report a failed
   write only there);
2. writes and (with fsync) syncs the member index and the manifest to
   temporaries of their own;
3. keeps every file that a later step replaces or removes before the
   commit under a hard link with a temporary name (where links are
   refused, by renaming it away right before that step);
4. renames, in this order: the new shards (of a generation that no file
   has, so no manifest lists them); the old member index away; the data
   file (one-file layouts) or the manifest (sharded): the *commit*; the
   old manifest away (a one-file output replacing a sharded set: then the
   commit); the new member index; then syncs the directory;
5. only then removes what the new set does not reuse: the old shards, the
   old data file, the kept files, the kept old manifest last.

A failure in 1 to 4 puts every name back as it was (the same inodes),
removes what was new and raises :class:`WriteError`.

Temporary names look like ``.<name>.pwriter-<host>-<pid>-<random>.tmp``.
The next run to an output name removes, under the lock, the temporaries of
its set left by gone processes of this host, and the shards that those
temporaries' manifests list and the current manifest does not (a killed
run's), never a file merely named like one.  ``merge -d`` leaves out every
file of the set and every shard a manifest temporary lists
(:func:`names_of_output`).

What a SIGKILL leaves, by the step it lands in (and the lock, taken over
by the next run on this host):

* writing, staging, keeping links: the old set whole, and temporaries;
* renaming the new shards: the old set; the new shards, listed only by the
  staged manifest temporary, so removed by the next run;
* hiding the old member index, up to the commit: the old set, without its
  member index;
* from the commit to renaming the new member index: the new set, without
  its member index (a one-file output replacing a sharded set: the old
  manifest, until it goes, still wins);
* after: the new set whole; old files listed by a kept manifest temporary,
  removed by the next run; temporaries.

Where hard links are refused (vfat, CIFS, some FUSE filesystems), a
replaced name is absent between its renaming away and the new file's
renaming in; a kill between them leaves the previous file under its kept
temporary name.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import os
import re
import secrets
import stat as stat_module
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

from ..errors import OutputExistsError, UsageError, WriteError

if TYPE_CHECKING:
    from ..plan.sizing import Striping

__all__ = ["Output", "OutputFiles", "CreatedFiles", "OutputSet", "OutputLock", "StreamOutput", "create_temporaries",
           "close_quietly", "close_checked", "shard_paths", "manifest_path", "member_index_path", "lock_path",
           "names_of_output", "read_shard_set", "is_temporary_name", "open_output_directory", "write_fully",
           "TEMP_MARKER", "LOCK_SUFFIX"]

TEMP_MARKER = ".pwriter-"
LOCK_SUFFIX = ".pwriter-lock"
T = TypeVar("T")
_TRACE_SUFFIXES = (".pfw.gz", ".pfw", ".gz", ".json", ".jsonl", ".txt")
# link() errors of filesystems without hard links: the kept file is then renamed away instead
_NO_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS)


def member_index_path(target: str) -> str:
    """The member index of a compressed output: ``<target>.members.json``."""
    return target + ".members.json"


def manifest_path(target: str) -> str:
    """The manifest of a sharded output: ``<target>.shards``."""
    return target + ".shards"


def lock_path(target: str) -> str:
    """The lock of an output name: ``.<name>.pwriter-lock`` beside it (see :class:`OutputLock`)."""
    directory, name = os.path.split(target)
    return os.path.join(directory, f".{name}{LOCK_SUFFIX}")


def _stem_and_suffix(name: str) -> tuple[str, str]:
    for suffix in _TRACE_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


def shard_paths(target: str, count: int, generation: int = 0) -> list[str]:
    """Shard names for ``target`` in read order: ``merged.pfw`` -> ``merged.shard_000.pfw``, ...
    (generation 1: ``merged.g1.shard_000.pfw``); the suffix stays last, so ``*.pfw`` still selects them."""
    directory, name = os.path.split(target)
    stem, suffix = _stem_and_suffix(name)
    width = max(3, len(str(count - 1)))
    if generation:
        stem = f"{stem}.g{generation}"
    return [os.path.join(directory, f"{stem}.shard_{index:0{width}d}{suffix}") for index in range(count)]


def _shard_pattern(target: str) -> re.Pattern[str]:
    """Exactly the base names of ``target``'s shards, of any generation; group 1 is the generation (None: 0)."""
    stem, suffix = _stem_and_suffix(os.path.basename(target))
    return re.compile(re.escape(stem) + r"(?:\.g([0-9]+))?\.shard_[0-9]{3,}" + re.escape(suffix) + r"\Z")


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


def _stale_temporary_of(entry: str) -> str | None:
    """The name whose temporary ``entry`` is, when a process of this host that is gone made it; else None."""
    match = re.fullmatch(r"\.(.+)" + re.escape(TEMP_MARKER + _host()) + r"-([0-9]+)-[0-9a-f]+\.tmp", entry)
    if match is None:
        return None
    pid = int(match.group(2))
    return match.group(1) if pid != os.getpid() and _process_is_gone(pid) else None


def _at_fresh_name(target: str, make: Callable[[str], T]) -> tuple[str, T]:
    """``make(name)`` for a new temporary name of ``target``, drawing another while ``make`` raises
    FileExistsError; returns the name and what ``make`` returned."""
    for attempts_left in reversed(range(8)):
        name = _temporary_name(target)
        try:
            return name, make(name)
        except FileExistsError:
            if not attempts_left:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def open_output_directory(target: str) -> int:
    """A descriptor of ``target``'s directory, through which its files are created, renamed and removed;
    :class:`WriteError` naming ``target`` when it cannot be opened."""
    directory = os.path.dirname(os.path.abspath(target))
    try:
        return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise WriteError(target, f"cannot open the output directory: {exc.strerror}", exc.errno) from None


def close_quietly(fds: Iterable[int]) -> None:
    """Close every descriptor of ``fds``, whatever closing one of them says (cleanup paths)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def close_checked(fds: Sequence[int], names: Sequence[str]) -> None:
    """Close every descriptor of ``fds`` (the file ``names[i]``); :class:`WriteError` naming the first whose
    close failed (NFS may report a failed write only there)."""
    failure: tuple[str, OSError] | None = None
    for fd, name in zip(fds, names, strict=False):
        try:
            os.close(fd)
        except OSError as exc:
            failure = failure or (name, exc)
    if failure is not None:
        failed, error = failure
        raise WriteError(failed, f"closing the file failed, so a write may not have reached it: "
                                 f"{error.strerror or error}", error.errno)


def _in(dir_fd: int | None, path: str) -> str:
    """The name to give an ``os`` call for ``path``: its base name relative to ``dir_fd``, else ``path``."""
    return os.path.basename(path) if dir_fd is not None else path


def _create_exclusively(target: str, create: Callable[[str], int] | None = None,
                        dir_fd: int | None = None) -> tuple[str, int]:
    """A new temporary beside ``target`` (``O_EXCL``), with the target's permissions; returns its name and
    descriptor.  ``create(path)`` makes and opens it instead of ``open`` (a Lustre layout); with ``dir_fd``,
    names are taken in that directory."""
    try:
        mode: int | None = stat_module.S_IMODE(os.stat(_in(dir_fd, target), dir_fd=dir_fd).st_mode)
    except OSError:
        mode = None
    temporary, fd = _at_fresh_name(
        target, create or (lambda name: os.open(_in(dir_fd, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                                0o666, dir_fd=dir_fd)))
    if mode is not None:
        try:
            os.fchmod(fd, mode)
        except OSError:
            os.close(fd)
            _unlink_quietly(temporary, dir_fd)
            raise
    return temporary, fd


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def create_temporaries(output: str, targets: Sequence[str], *, direct: bool = False,
                       striping: Striping | None = None, first: int = 0, dir_fd: int | None = None
                       ) -> tuple[list[str], list[int], list[int]]:
    """A temporary beside each of ``targets`` (files ``first``, ... of ``output``; :func:`_create_exclusively`),
    with ``striping``'s layout for its file number; returns the temporaries, their descriptors and (``direct``)
    their O_DIRECT descriptors.  On failure removes what it made and raises :class:`WriteError` naming
    ``output`` (:class:`UsageError` where O_DIRECT is refused)."""
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
            temporary, fd = _create_exclusively(target, create, dir_fd)
            temporaries.append(temporary)
            fds.append(fd)
            if direct:
                direct_fds.append(os.open(_in(dir_fd, temporary), os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC,
                                          dir_fd=dir_fd))
    except OSError as exc:
        close_quietly(fds + direct_fds)
        for temporary in temporaries:
            _unlink_quietly(temporary, dir_fd)
        if direct and exc.errno == errno.EINVAL:
            raise UsageError(f"{output}: this filesystem does not support O_DIRECT (--direct)") from None
        layout = " with its Lustre layout" if striping is not None else ""
        raise WriteError(output, f"cannot create a temporary file{layout}: {exc.strerror or exc}",
                         exc.errno) from None
    return temporaries, fds, direct_fds


class OutputLock:
    """The lock of one output name (see the module docstring), in the directory ``dir_fd``.

    A holder that runs, or cannot be checked (another host), makes :meth:`acquire` raise :class:`UsageError`
    naming it; a gone holder of this host is taken over, exclusively: the taker creates
    ``.<name>.pwriter-lock.break`` (``O_EXCL``), checks under it that the lock still names that holder,
    removes the lock and the breaker, then competes for a new lock like anyone.  So two takers never remove
    a live lock.  (A breaker whose holder is gone is removed like a stale lock.)
    """

    ATTEMPTS = 20
    UNREADABLE_WAIT = 0.5
    """Seconds to wait for the content of a lock whose creator has not yet written it."""

    def __init__(self, target: str, dir_fd: int) -> None:
        self.target = target
        self.path = lock_path(os.path.abspath(target))
        self._name = os.path.basename(self.path)
        self._breaker = self._name + ".break"
        self._dir_fd = dir_fd
        self._mine = f"{_host()} {os.getpid()}\n".encode()
        self.held = False

    def acquire(self) -> None:
        """Take the lock, or raise :class:`UsageError` naming its holder (see the class docstring)."""
        for _ in range(self.ATTEMPTS):
            try:
                fd = self._create(self._name)
            except FileExistsError:
                holder = self._holder(self._name)
                if holder is None:  # released meanwhile
                    continue
                if not _is_stale(holder):
                    raise self._refusal(holder) from None
                self._take_over(holder)
                continue
            os.close(fd)
            self.held = True
            return
        raise UsageError(f"{self.target}: the output's lock {self.path} keeps changing hands; try again")

    def release(self) -> None:
        """Remove the lock, if this process holds it (idempotent; never raises)."""
        if not self.held:
            return
        self.held = False
        if _read_quietly(self._name, self._dir_fd) == self._mine:  # (never another's, should it have been taken over)
            _unlink_quietly(self._name, self._dir_fd)

    def _create(self, name: str) -> int:
        """Create ``name`` exclusively, holding this process's ``host pid``; FileExistsError if it exists."""
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=self._dir_fd)
        except FileExistsError:
            raise
        except OSError as exc:
            raise WriteError(self.target, f"cannot create the output's lock {self.path}: {exc.strerror}",
                             exc.errno) from None
        try:
            write_fully(fd, self._mine)
        except OSError as exc:
            os.close(fd)
            _unlink_quietly(name, self._dir_fd)
            raise WriteError(self.target, f"cannot write the output's lock {self.path}: {exc.strerror}",
                             exc.errno) from None
        return fd

    def _holder(self, name: str) -> tuple[str, int | None] | None:
        """The ``(host, pid)`` that ``name`` holds; None if it is gone; pid None if unreadable for
        :attr:`UNREADABLE_WAIT`."""
        deadline = time.monotonic() + self.UNREADABLE_WAIT
        while True:
            content = _read_quietly(name, self._dir_fd)
            if content is None:
                return None if not _exists(name, self._dir_fd) else ("?", None)
            fields = content.decode("utf-8", "replace").split()
            if content.endswith(b"\n") and len(fields) == 2 and fields[1].isdigit():
                return fields[0], int(fields[1])
            if time.monotonic() >= deadline:
                return (fields[0] if fields else "?"), None
            time.sleep(0.01)  # its creator is writing it

    def _take_over(self, holder: tuple[str, int | None]) -> None:
        """Remove the stale lock of ``holder`` under the breaker (or leave it, if another is doing so)."""
        try:
            fd = self._create(self._breaker)
        except FileExistsError:
            breaker = self._holder(self._breaker)
            if breaker is not None and _is_stale(breaker):
                _unlink_quietly(self._breaker, self._dir_fd)
            else:
                time.sleep(0.01)  # another process is taking it over right now
            return
        try:
            os.close(fd)
            if self._holder(self._name) == holder:
                _unlink_quietly(self._name, self._dir_fd)
        finally:
            _unlink_quietly(self._breaker, self._dir_fd)

    def _refusal(self, holder: tuple[str, int | None]) -> UsageError:
        host, pid = holder
        who = f"host {host}, pid {pid}" if pid is not None else "a holder whose lock cannot be read"
        if host == _host() and pid is not None:
            hint = ""
        else:  # (another host: whether it still runs cannot be told from here)
            hint = "; if no pwriter runs there any more, remove the lock"
        return UsageError(f"{self.target}: another pwriter is writing this output ({who}): its lock {self.path} "
                          f"stays until it has published or failed{hint}")


def _is_stale(holder: tuple[str, int | None]) -> bool:
    """Whether a lock's holder is a process of this host that is gone."""
    host, pid = holder
    return host == _host() and pid is not None and pid != os.getpid() and _process_is_gone(pid)


def _exists(name: str, dir_fd: int | None) -> bool:
    try:
        os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


class OutputFiles(Protocol):
    """The files a chunk sink writes to, and (a shard size) their next shard."""

    @property
    def targets(self) -> list[str]:
        """The files' final names, in read order (one per descriptor of :attr:`fds`)."""

    @property
    def fds(self) -> list[int]:
        """The files' descriptors, in read order (after :meth:`create`)."""

    @property
    def direct_fds(self) -> list[int]:
        """Their O_DIRECT descriptors (``create(direct=True)``), else empty."""

    def add_shard(self) -> tuple[int, int | None]:
        """Make the next shard (a shard size); returns its descriptor and its O_DIRECT one (or None)."""


class Output(OutputFiles, Protocol):
    """What the writer uses of an output: its files, created, grown by a shard, published or discarded.

    Implemented by :class:`OutputSet` (published all or nothing), :class:`StreamOutput` (nothing to publish
    or take back) and :class:`pwriter.faces.mpi.RankOutput` (one rank's share; rank 0 publishes the set).
    """

    @property
    def manifest(self) -> str | None:
        """The manifest of a sharded output, else None."""

    @property
    def can_sync(self) -> bool:
        """Whether fsync means anything for the files (not for a pipe)."""

    def create(self, *, direct: bool = False) -> list[int]:
        """Make (or open) the files for writing; returns :attr:`fds`."""

    def publish(self, *, fsync: bool, sidecars: dict[str, bytes] | None = None) -> None:
        """Close the written (and with ``fsync`` synced) files, checking each close, and put them in place with
        ``sidecars`` (name -> content); raises, publishing nothing, on failure."""

    def discard(self) -> None:
        """Close the files and take back what can be (idempotent; also the end of a publish)."""


class CreatedFiles:
    """Files an output creates itself (:func:`create_temporaries`), and for a growing sharded set each next
    shard.  ``first``: the file number of the first target (its Lustre layout); ``generation``: of the shard
    names.  The base of :class:`OutputSet` and :class:`pwriter.faces.mpi.RankOutput`."""

    def __init__(self, target: str, targets: Sequence[str], *, striping: Striping | None = None, first: int = 0,
                 generation: int = 0) -> None:
        self.target = target
        self.targets = list(targets)
        self.temporaries: list[str] = []
        self.fds: list[int] = []
        self.direct_fds: list[int] = []
        self.can_sync = True
        self._striping = striping
        self._first = first
        self._generation = generation
        self._direct = False
        self._dir_fd: int | None = None

    def _open_directory(self) -> int:
        if self._dir_fd is None:
            self._dir_fd = open_output_directory(self.target)
        return self._dir_fd

    def _create_files(self, *, direct: bool) -> None:
        """Create the temporaries of :attr:`targets` (:func:`create_temporaries`)."""
        self._direct = direct
        self.temporaries, self.fds, self.direct_fds = create_temporaries(
            self.target, self.targets, direct=direct, striping=self._striping, first=self._first,
            dir_fd=self._open_directory())

    def add_shard(self) -> tuple[int, int | None]:
        """A growing set: create the next shard's temporary as the others were; returns its descriptor and
        its O_DIRECT one (or None).  :attr:`targets` then names every shard (the number's width may grow)."""
        assert self._dir_fd is not None, "add_shard: files that this output created"
        index = len(self.fds)
        names = shard_paths(self.target, index + 1, self._generation)
        temporaries, fds, direct_fds = create_temporaries(
            self.target, names[index:], direct=self._direct, striping=self._striping, first=self._first + index,
            dir_fd=self._dir_fd)
        self.temporaries += temporaries
        self.fds += fds
        self.direct_fds += direct_fds
        self.targets = names
        return fds[0], direct_fds[0] if direct_fds else None

    def close_files(self) -> None:
        """Close every descriptor, whatever closing says (cleanup paths)."""
        close_quietly(self.fds + self.direct_fds)
        self.fds, self.direct_fds = [], []

    def _close_files_checked(self) -> None:
        """Close every descriptor (:func:`close_checked`: :class:`WriteError` naming a file whose close failed)."""
        fds, names = self.fds + self.direct_fds, self.targets + self.targets[: len(self.direct_fds)]
        self.fds, self.direct_fds = [], []
        close_checked(fds, names)


@dataclasses.dataclass(frozen=True)
class _Found:
    """What an output name stands for now (base names): see the module docstring."""

    data: bool
    index: bool
    manifest: bool
    listed: tuple[str, ...]
    """The shards the manifest lists."""


def _survey(name: str, dir_fd: int) -> _Found:
    """What the output name ``name`` (a base name in ``dir_fd``) stands for now."""
    manifest, index = manifest_path(name), member_index_path(name)
    return _Found(data=_exists(name, dir_fd), index=_exists(index, dir_fd), manifest=_exists(manifest, dir_fd),
                  listed=tuple(_read_manifest(manifest, dir_fd)))


class OutputSet(CreatedFiles):
    """The files of one output: targets in read order, their temporaries, and (sharded) the manifest.
    :meth:`check` takes the lock and decides the names, :meth:`create` makes the temporaries; finished by
    :meth:`publish` or :meth:`discard` (which releases the lock, and may follow a publish).

    Shard names are of a *generation* that no file has (``merged.shard_000.pfw`` and
    ``merged.g1.shard_000.pfw`` alternate), so a reader of the old manifest never sees a new shard.
    ``force`` replaces the whole set the name stands for.  A sharded output of ``files=0`` *grows*:
    :meth:`add_shard` makes each shard while it is written.
    """

    def __init__(self, target: str, *, sharded: bool, files: int, force: bool, sidecars: Sequence[str] = (),
                 striping: Striping | None = None) -> None:
        super().__init__(target, shard_paths(target, files) if sharded else [target], striping=striping)
        self.sharded = sharded
        self.force = force
        self.manifest = manifest_path(target) if sharded else None
        self.sidecars = list(sidecars)
        self._files = files
        self._lock: OutputLock | None = None
        self._name = os.path.basename(target)

    @property
    def names(self) -> list[str]:
        """Every name this output will publish."""
        return self.targets + self.sidecars + ([self.manifest] if self.manifest else [])

    @property
    def generation(self) -> int:
        """Sharded, after :meth:`check`: the generation of its shards' names."""
        return self._generation

    def check(self, inputs: Iterable[str] = ()) -> None:
        """Take the output's lock, then, under it, decide and check the names.

        Refuses with :class:`UsageError` (releasing the lock): a missing directory, a sharded name with a
        newline (its manifest could not list it), an output another run is writing, an existing output
        without ``force``, an output that is one of ``inputs`` (same inode; a file ``force`` would remove
        counts too), and even with ``force`` a name that is not a regular file or a symlink to one.
        Removes what killed runs of this host left and, sharded, picks the shard generation.
        """
        directory = os.path.dirname(os.path.abspath(self.target))
        if not os.path.isdir(directory):
            raise UsageError(f"{self.target}: output directory {directory} does not exist")
        if self.sharded and "\n" in self._name:
            raise UsageError(f"{self.target!r}: a sharded output's name cannot hold a newline (its manifest "
                             "lists one shard name per line)")
        input_stats = []
        for path in inputs:
            try:
                input_stats.append((path, os.stat(path)))
            except OSError:
                continue
        try:
            dir_fd = self._open_directory()
            self._lock = OutputLock(self.target, dir_fd)
            self._lock.acquire()
            found = _survey(self._name, dir_fd)
            entries = set(os.listdir(dir_fd))
            entries -= _remove_leftovers(self.target, entries, found, [stat for _, stat in input_stats], dir_fd)
            if self.sharded:
                self._generation = _free_generation(self.target, entries)
                self.targets = shard_paths(self.target, self._files, self._generation)
            directory = os.path.dirname(self.target)
            replaced = [os.path.join(directory, name) for name in found.listed]
            own = [self.target, member_index_path(self.target), manifest_path(self.target)]
            _check_names(list(dict.fromkeys(own + self.names + replaced)), replaced, input_stats, force=self.force)
        except BaseException:
            self.discard()
            raise

    def create(self, *, direct: bool = False) -> list[int]:
        """Create the temporaries (with ``striping``'s Lustre layout; ``direct``: also an O_DIRECT descriptor
        each, :attr:`direct_fds`); returns their descriptors in read order.  On failure everything is
        discarded (the lock released)."""
        try:
            self._create_files(direct=direct)
        except BaseException:
            self.discard()
            raise
        return self.fds

    def publish(self, *, fsync: bool, sidecars: dict[str, bytes] | None = None) -> None:
        """Put the written temporaries and ``sidecars`` (name -> content) in place as the whole set, all or
        nothing (the module docstring's steps).  On failure every previous file is back (the same inode) and
        :class:`WriteError` is raised (:class:`UsageError`: an output appeared meanwhile without ``force``);
        the lock is released either way."""
        try:
            self._close_files_checked()
        except BaseException:
            self.discard()
            raise
        publication = _Publication(self, self._open_directory(), fsync=fsync)
        try:
            publication.run(sidecars or {})
        except (OSError, UsageError) as exc:
            self.discard()
            if isinstance(exc, UsageError):
                raise
            what = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
            raise WriteError(self.target, f"cannot publish the output: {what}", exc.errno) from None
        self.discard()

    def discard(self) -> None:
        """Close and remove every temporary and release the lock (idempotent; also the end of a publish)."""
        self.close_files()
        for temporary in self.temporaries:
            _unlink_quietly(temporary, self._dir_fd)
        self.temporaries = []
        if self._lock is not None:
            self._lock.release()
        if self._dir_fd is not None:
            close_quietly([self._dir_fd])
            self._dir_fd = None


def _remove_leftovers(target: str, entries: Iterable[str], found: _Found, inputs: list[os.stat_result],
                      dir_fd: int) -> set[str]:
    """Remove the temporaries of ``target``'s set (of ``entries``) that gone processes of this host left, and
    first the shards their manifests list and the current one does not (unless an input).  Returns the
    names removed."""
    name = os.path.basename(target)
    pattern = _shard_pattern(target)
    ours = {name, member_index_path(name), manifest_path(name)}
    stale: dict[str, str] = {}  # temporary -> the name it is of
    for entry in entries:
        of = _stale_temporary_of(entry)
        if of is not None and (of in ours or pattern.match(of)):
            stale[entry] = of
    going: dict[str, None] = {}  # in order: the orphaned shards first, then the temporaries
    for entry, of in stale.items():
        if of == manifest_path(name):
            for shard in _read_manifest(entry, dir_fd):
                if pattern.match(shard) and shard not in found.listed and not _is_input(shard, inputs, dir_fd):
                    going[shard] = None
    going.update(dict.fromkeys(stale))
    removed = set()
    for entry in going:
        try:
            os.unlink(entry, dir_fd=dir_fd)
        except OSError:
            continue
        removed.add(entry)
    return removed


def _is_input(name: str, inputs: list[os.stat_result], dir_fd: int) -> bool:
    try:
        stat = os.stat(name, dir_fd=dir_fd)
    except OSError:
        return False
    return any(_same_file(stat, input_stat) for input_stat in inputs)


def _free_generation(target: str, entries: Iterable[str]) -> int:
    """The first generation of ``target``'s shard names of which no file is among ``entries``."""
    pattern = _shard_pattern(target)
    taken = set()
    for entry in entries:
        match = pattern.match(entry)
        if match is not None:
            taken.add(int(match.group(1) or 0))
    return next(generation for generation in range(len(taken) + 1) if generation not in taken)


def _check_names(names: Sequence[str], replaced: Sequence[str], input_stats: list[tuple[str, os.stat_result]],
                 *, force: bool) -> None:
    """Refuse a name of ``names`` that is an input, exists without ``force``, or (unless ``replaced``) is
    not a regular file or a symlink to one (:meth:`OutputSet.check`)."""
    for name in names:
        try:
            link = os.lstat(name)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise UsageError(f"{name}: cannot examine the output: {exc.strerror}") from None
        stat: os.stat_result | None = link
        if stat_module.S_ISLNK(link.st_mode):
            try:
                stat = os.stat(name)
            except OSError:
                stat = None
        if name not in replaced:
            _check_replaceable(name, link, stat)
        if stat is None:
            continue
        for path, input_stat in input_stats:
            if _same_file(stat, input_stat):
                raise UsageError(f"{name}: the output is the input {path}")
        if not force:
            raise OutputExistsError(name, "output exists")


def _check_replaceable(name: str, link: os.stat_result, stat: os.stat_result | None) -> None:
    """Refuse ``name`` (``stat`` None: a dangling link) unless a regular file or a symlink to one."""
    if _is_system_name(name, is_link=stat_module.S_ISLNK(link.st_mode)):
        raise UsageError(f"{name}: the output is a device or process file (/dev, /proc); "
                         "refusing to replace it (use -o - for standard output)")
    if stat is None:
        raise UsageError(f"{name}: the output is a symlink to nothing; refusing to replace it")
    if not stat_module.S_ISREG(stat.st_mode):
        what = _kind_of(stat.st_mode)
        via = " (through a symlink)" if stat_module.S_ISLNK(link.st_mode) else ""
        raise UsageError(f"{name}: the output is {what}{via}, not a regular file; refusing to replace it")


_Step = tuple[str, str, str]
"""A step of a publish: ``(step, name, temporary)``, step ``put`` (the temporary onto the name) or ``hide``."""


class _Publication:
    """One publish of an :class:`OutputSet` (steps 2 to 5 of the module docstring) in ``dir_fd``; a failure
    before the commit is undone (:meth:`_restore`).  Every temporary it makes joins the set's
    ``temporaries`` until it becomes a published name."""

    def __init__(self, files: OutputSet, dir_fd: int, *, fsync: bool) -> None:
        self.files = files
        self.dir_fd = dir_fd
        self.fsync = fsync
        self.done: list[tuple[str, str, bool]] = []  # ("put", name, over its kept file) or ("hide", name, False)
        self.kept: dict[str, str] = {}  # name -> the temporary that keeps its previous file ("": links are refused)

    def run(self, sidecars: dict[str, bytes]) -> None:
        """Publish, with ``sidecars``; raises OSError or :class:`UsageError`, every name as before."""
        try:
            found, steps = self._plan(sidecars)
            self._keep_what_goes(steps)
            self._take_steps(steps)
            if self.fsync:
                os.fsync(self.dir_fd)
        except (OSError, UsageError):
            self._restore()
            raise
        self._remove_replaced(found)

    def _plan(self, sidecars: dict[str, bytes]) -> tuple[_Found, list[_Step]]:
        """The renames of the publish, in order; stages the small files."""
        files, name = self.files, self.files._name
        found = _survey(name, self.dir_fd)
        if not files.force and (found.data or found.index or found.manifest):
            existing = name if found.data else manifest_path(name) if found.manifest else member_index_path(name)
            raise OutputExistsError(os.path.join(os.path.dirname(files.target), existing),
                                    "output appeared while writing")
        smalls = {os.path.basename(path): content for path, content in sidecars.items()}
        if files.manifest:
            smalls[os.path.basename(files.manifest)] = b"".join(
                os.fsencode(os.path.basename(target)) + b"\n" for target in files.targets)
        staged = {small: os.path.basename(self._stage_small(small, content)) for small, content in smalls.items()}
        index, manifest = member_index_path(name), manifest_path(name)
        data = [("put", os.path.basename(target), os.path.basename(temporary))
                for temporary, target in zip(files.temporaries, files.targets, strict=False)]
        hide_index = [("hide", index, "")] if found.index else []
        put_index = [("put", index, staged[index])] if index in staged else []
        if files.manifest:
            steps = data + hide_index + [("put", manifest, staged[manifest])] + put_index
        else:
            steps = hide_index + data + ([("hide", manifest, "")] if found.manifest else []) + put_index
        return found, steps

    def _stage_small(self, name: str, content: bytes) -> str:
        """Write a small file (manifest, index) to a temporary of its own and sync it; returns the temporary."""
        path = os.path.join(os.path.dirname(self.files.target), name)
        temporary, fd = _create_exclusively(path, dir_fd=self.dir_fd)
        self.files.temporaries.append(temporary)
        try:
            write_fully(fd, content)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        return temporary

    def _keep_what_goes(self, steps: list[_Step]) -> None:
        """Keep (a hard link) every file that a step replaces or removes before the commit."""
        for step, name, _ in steps:
            if name not in self.kept and (step == "hide" or self.files.force) and _exists(name, self.dir_fd):
                self.kept[name] = self._keep(name, by_link=True)

    def _take_steps(self, steps: list[_Step]) -> None:
        """Take ``steps`` in order, recording each as it is taken (what :meth:`_restore` undoes)."""
        kept, done = self.kept, self.done
        for step, name, temporary in steps:
            if step == "hide" and name not in kept:  # (gone meanwhile)
                continue
            if step == "hide" or kept.get(name) == "":  # its file goes away now: unlinked, or renamed away
                if kept[name]:
                    os.unlink(name, dir_fd=self.dir_fd)
                else:
                    kept[name] = self._keep(name, by_link=False)
                done.append(("hide", name, False))
            if step == "put":
                self._rename(temporary, name)
                done.append(("put", name, name in kept and ("hide", name, False) not in done))

    def _keep(self, name: str, *, by_link: bool) -> str:
        """Keep ``name``'s file under a new temporary name, by a hard link or (``by_link`` false) a rename;
        returns the temporary's base name, or "" where links are refused."""
        dir_fd = self.dir_fd

        def keep(temporary: str) -> None:
            base = os.path.basename(temporary)
            if by_link:
                os.link(name, base, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            elif _exists(base, dir_fd):
                raise FileExistsError(errno.EEXIST, "taken", base)
            else:
                os.rename(name, base, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)

        try:
            backup, _ = _at_fresh_name(os.path.join(os.path.dirname(self.files.target), name), keep)
        except OSError as exc:
            if by_link and exc.errno in _NO_LINKS:
                return ""
            raise
        self.files.temporaries.append(backup)
        return os.path.basename(backup)

    def _rename(self, temporary: str, target: str) -> None:
        """Put ``temporary`` onto ``target``: with ``force`` replacing it, else never over a file."""
        dir_fd = self.dir_fd
        appeared = OutputExistsError(os.path.join(os.path.dirname(self.files.target), target),
                                     "output appeared while writing")
        if self.files.force:
            os.replace(temporary, target, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        else:
            try:
                os.link(temporary, target, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            except FileExistsError:
                raise appeared from None
            except OSError as exc:
                if exc.errno not in _NO_LINKS:
                    raise
                if _exists(target, dir_fd):  # no hard links here: a checked rename
                    raise appeared from None
                os.rename(temporary, target, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            else:
                os.unlink(temporary, dir_fd=dir_fd)
        self._forget(temporary)

    def _forget(self, temporary: str) -> None:
        """``temporary`` is now a published name: never remove it as a temporary."""
        self.files.temporaries = [name for name in self.files.temporaries if os.path.basename(name) != temporary]

    def _restore(self) -> None:
        """Undo a failed publish: each name gets back what it held before (best effort, never raises)."""
        dir_fd = self.dir_fd
        for step, name, replaced in reversed(self.done):
            try:
                if step == "hide":  # (the name is absent)
                    os.rename(self.kept[name], name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                elif replaced:
                    os.replace(self.kept[name], name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                else:
                    os.unlink(name, dir_fd=dir_fd)
            except OSError:
                pass
        if self.fsync:
            try:
                os.fsync(dir_fd)
            except OSError:
                pass

    def _remove_replaced(self, found: _Found) -> None:
        """After the commit: remove what the new set does not reuse, the kept files, the kept manifest last."""
        files, kept = self.files, self.kept
        new = {os.path.basename(target) for target in files.targets}
        old = [name for name in found.listed if name not in new]
        if files.manifest and found.data:
            old.append(files._name)
        manifest = manifest_path(files._name)
        backups = [backup for name, backup in kept.items() if backup and name != manifest]
        for name in [*old, *backups, *([kept[manifest]] if kept.get(manifest) else [])]:
            _unlink_quietly(name, self.dir_fd)


def names_of_output(target: str) -> list[str]:
    """Every file of ``target``'s set, and every shard a manifest temporary lists: what ``merge -d`` skips."""
    directory, name = os.path.split(target)
    manifest = manifest_path(target)
    names = [target, member_index_path(target), manifest, *read_shard_set(manifest)]
    pattern = _shard_pattern(target)
    prefix = f".{os.path.basename(manifest)}{TEMP_MARKER}"
    try:
        entries = os.listdir(directory or ".")
    except OSError:
        entries = []
    for entry in entries:
        if entry.startswith(prefix) and entry.endswith(".tmp"):
            names.extend(os.path.join(directory, shard) for shard in _read_manifest(os.path.join(directory, entry))
                         if pattern.match(shard))
    return list(dict.fromkeys(names))


class StreamOutput:
    """A stream (standard output, a pipe, an open file) as an :class:`Output` of one file, written in order
    at its own position; nothing to create, publish or discard."""

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
        mode = os.fstat(fd).st_mode
        self.can_sync = stat_module.S_ISREG(mode) or stat_module.S_ISBLK(mode)

    def create(self, *, direct: bool = False) -> list[int]:
        """The stream's descriptor (O_DIRECT refused)."""
        if direct:
            raise UsageError(f"{self.target}: --direct needs a file, not a stream")
        return self.fds

    def add_shard(self) -> tuple[int, int | None]:
        """Never called: a stream is never sharded (the writer refuses it)."""
        raise RuntimeError("a stream output has no shards")

    def publish(self, *, fsync: bool, sidecars: dict[str, bytes] | None = None) -> None:
        """Nothing to publish: the bytes are already in the stream (no sidecars)."""

    def discard(self) -> None:
        """Nothing to discard: bytes written to a stream cannot be taken back."""


def write_fully(fd: int, content: bytes) -> None:
    """``os.write`` every byte of ``content`` (short writes resumed, EINTR retried; a zero write is EIO)."""
    view = memoryview(content)
    while view:
        try:
            done = os.write(fd, view)
        except InterruptedError:
            continue
        if done == 0:
            raise OSError(errno.EIO, "a write wrote nothing")
        view = view[done:]


def _is_system_name(name: str, *, is_link: bool) -> bool:
    """Whether ``name`` is, or leads through symlinks to, a name under /dev or /proc (not /dev/shm)."""
    paths = [os.path.abspath(name), os.path.realpath(name)]
    if is_link:
        paths.append(os.readlink(name))
    return any(path.startswith(("/dev/", "/proc/")) and not path.startswith("/dev/shm/") for path in paths)


def _kind_of(mode: int) -> str:
    kinds = ((stat_module.S_ISDIR, "a directory"), (stat_module.S_ISFIFO, "a FIFO"),
             (stat_module.S_ISSOCK, "a socket"), (stat_module.S_ISCHR, "a character device"),
             (stat_module.S_ISBLK, "a block device"))
    return next((what for test, what in kinds if test(mode)), "not a regular file")


def read_shard_set(manifest: str) -> list[str]:
    """The shard paths a manifest lists, in read order (the names exactly as listed)."""
    directory = os.path.dirname(os.path.abspath(manifest))
    return [os.path.join(directory, name) for name in _read_manifest(manifest)]


def _read_manifest(manifest: str, dir_fd: int | None = None) -> list[str]:
    """The names a manifest lists, one a line, nothing stripped but the newline; [] if unreadable."""
    content = _read_quietly(manifest, dir_fd) or b""
    return [os.fsdecode(line) for line in content.split(b"\n") if line]


def _read_quietly(path: str, dir_fd: int | None) -> bytes | None:
    """The content of the small file ``path`` (:func:`_in`); None if it cannot be read."""
    try:
        fd = os.open(_in(dir_fd, path), os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        with open(fd, "rb") as handle:
            return handle.read()
    except OSError:
        return None


def _unlink_quietly(path: str, dir_fd: int | None = None) -> None:
    try:
        os.unlink(_in(dir_fd, path), dir_fd=dir_fd)
    except OSError:
        pass


_OUTPUTS: tuple[type[Output], ...] = (OutputSet, StreamOutput)  # (mypy checks each against the protocol)
