"""The ``pwriter`` command line.

Start-up is kept light: this module imports only the standard library at
the top; trio, pydantic and psutil are imported by the command that needs
them.  Errors print one line, ``pwriter: error: <file>: <problem>``, and exit
with the code documented in :mod:`pwriter.errors` (0 ok, 1 data or I/O
error while working, 2 wrong before any data was read, 130 interrupted by
SIGINT, 143 terminated by SIGTERM; in both of the last, nothing is published).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"pwriter: error: {message} (see {self.prog} --help)\n")


def _settings_epilog() -> str:
    """The PWRITER_* settings and what each means (built only for --help: it imports pydantic)."""
    from ..plan.settings import describe_settings

    rows = describe_settings()
    width = max(len(name) for name, _, _ in rows)
    lines = [f"  {name:<{width}}  {description} (default {value})" for name, value, description in rows]
    return "settings, from the environment (options above win):\n" + "\n".join(lines)


def _at_least_one(text: str) -> int:
    """An argparse type: a count of at least 1."""
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"{count}: at least 1")
    return count


def _parser(*, settings_help: bool = False) -> argparse.ArgumentParser:
    parser = _Parser(prog="pwriter", description="Merge and write DFTracer traces at the speed of the storage.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    merge = commands.add_parser("merge", help="merge .pfw / .pfw.gz traces into one trace",
                                epilog=_settings_epilog() if settings_help else None,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _merge_arguments(merge)
    _verify_arguments(commands.add_parser(
        "verify", help="check that an output holds exactly the event lines of its inputs"))
    _info_arguments(commands.add_parser("info", help="show the filesystem, sizing and backends for a path"))
    _gen_corpus_arguments(commands.add_parser("gen-corpus", help="write an example corpus of mixed traces"))
    return parser


def _merge_arguments(merge: argparse.ArgumentParser) -> None:
    merge.add_argument("inputs", nargs="*", metavar="INPUT", help="trace files (.pfw or .pfw.gz, mixed)")
    merge.add_argument("-d", "--directory", metavar="DIR", action="append", default=[],
                       help="also merge every *.pfw and *.pfw.gz in DIR (repeat for more directories)")
    merge.add_argument("-r", "--recursive", action="store_true",
                       help="with -d: every *.pfw and *.pfw.gz below DIR, at any depth (hidden names skipped, "
                            "symlinked directories not followed)")
    merge.add_argument("-o", "--output", required=True, metavar="OUTPUT",
                       help="the merged trace to write ('-': standard output, in read order)")
    merge.add_argument("--layout", choices=("auto", "striped", "padded-striped", "sharded"), default=None)
    merge.add_argument("--backend", choices=("auto", "io_uring", "threads"), default=None)
    merge.add_argument("--stripe-size", metavar="SIZE", default=None,
                       help="bytes per write, e.g. 4MiB, 1M (on Lustre also the stripe size set on create)")
    merge.add_argument("--stripe-count", metavar="N|auto", default=None,
                       help="Lustre: OSTs each new output file is striped over (-1 all, 0 the directory's "
                            "default; auto: all for outputs from 1 GiB, one per shard)")
    merge.add_argument("--lanes", metavar="N", default=None, help="write lanes (shards when sharded)")
    merge.add_argument("--workers", dest="old_workers", metavar="N", default=None,
                       help=argparse.SUPPRESS)  # (the old name of --lanes: works, and warns)
    merge.add_argument("--shard-size", metavar="SIZE", default=None,
                       help="sharded layout: a lane starts a new shard once its shard holds SIZE bytes of event "
                            "lines (e.g. 256MiB; the last line may cross it); each shard is a complete trace")
    merge.add_argument("--force", action="store_true", help="replace an existing output")
    merge.add_argument("--fsync", action=argparse.BooleanOptionalAction, default=None,
                       help="fsync the output before publishing it (default: on)")
    merge.add_argument("--compress", action="store_true", default=None,
                       help="write gzip members (implied by an OUTPUT ending in .gz)")
    merge.add_argument("--level", metavar="N", default=None, help="compression level (isal: 0-3; default 1)")
    merge.add_argument("--direct", action="store_true", default=None,
                       help="write with O_DIRECT (padded-striped layout; for the durable path)")
    merge.add_argument("--wrap", choices=("auto", "array", "none"), default=None,
                       help="array: a [ line before the events and a ] line after them; none: plain NDJSON; "
                            "auto (default): array when an input is array style")
    merge.add_argument("--json", action="store_true", help="print one JSON object describing the result")
    merge.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="show progress on stderr (default: when stderr is a terminal)")

    merge.add_argument("--salvage", action="store_true",
                       help="keep the complete events of inputs cut short by a crash, drop their damaged tail")
    merge.add_argument("--validate", action="store_true",
                       help="parse every event as JSON; a line that is not is an error (dropped with --salvage)")
    merge.add_argument("--require-complete", action="store_true",
                       help="fail (exit 1, nothing published) when an input is incomplete: empty, salvaged, "
                            "without its DFTracer end event, or holding fewer or more events than it claims")
    merge.add_argument("--verify", action="store_true",
                       help="after publishing, check that the output holds exactly the inputs' event lines")
    merge.add_argument("--mpi", action=argparse.BooleanOptionalAction, default=None,
                       help="merge with every MPI rank (default: when started by mpiexec, mpirun or srun with "
                            "more than one rank; needs pip install 'pwriter[mpi]'); --no-mpi: one process "
                            "whatever the environment says")
    merge.add_argument("--mpi-offsets", choices=("counter", "exscan"), default="counter",
                       help="MPI, striped: offsets from a shared counter (default) or from a prefix sum of "
                            "counted bytes (reads the inputs twice; plain output only)")


def _verify_arguments(verify: argparse.ArgumentParser) -> None:
    verify.add_argument("output", metavar="OUTPUT", help="a merged trace (plain, gzip, or a sharded set)")
    verify.add_argument("inputs", nargs="*", metavar="INPUT")
    verify.add_argument("-d", "--directory", metavar="DIR", action="append", default=[],
                        help="also every *.pfw and *.pfw.gz in DIR (repeat for more directories)")
    verify.add_argument("-r", "--recursive", action="store_true",
                        help="with -d: every *.pfw and *.pfw.gz below DIR, as for merge")
    verify.add_argument("--salvage", action="store_true",
                        help="read the inputs as merge --salvage does: a damaged tail is not expected in the output")
    verify.add_argument("--validate", action="store_true",
                        help="read the inputs as merge --validate does (with --salvage: a line that is not valid "
                             "JSON is not expected in the output)")
    verify.add_argument("--json", action="store_true")


def _info_arguments(info: argparse.ArgumentParser) -> None:
    info.add_argument("path", metavar="PATH")
    info.add_argument("--json", action="store_true")
    info.add_argument("--size", metavar="SIZE", default=None,
                      help="the output's expected size (what a merge knows), for the Lustre layout shown")
    info.add_argument("--stripe-count", metavar="N|auto", default=None, help="as for merge")
    info.add_argument("--stripe-size", metavar="SIZE", default=None, help="as for merge")
    info.add_argument("--layout", choices=("auto", "striped", "padded-striped", "sharded"), default=None)


def _gen_corpus_arguments(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("directory", metavar="DIR")
    gen.add_argument("--files", type=_at_least_one, default=200)
    gen.add_argument("--events", type=_at_least_one, default=500, help="events per file")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--force", action="store_true", help="overwrite rank_N.pfw[.gz] files already in DIR")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code.  Called with ``argv``, it leaves the signal handlers as
    it found them (as the command, a published merge ignores SIGINT and SIGTERM to the exit)."""
    if argv is not None:
        with _SIGNALS.restored():
            return _run(list(argv))
    return _run(sys.argv[1:])


def _run(arguments: list[str]) -> int:
    """:func:`main` for ``arguments``, leaving the signal handlers as a merge set them."""
    args = _parser(settings_help="-h" in arguments or "--help" in arguments).parse_args(arguments)
    from ..errors import OutputExistsError, PwriterError, other_errors

    try:
        code = _command(args)
        sys.stdout.flush()  # (here, not at exit: a reader that went away, ``| head``, is found now)
        return code
    except BrokenPipeError:  # the reader of stdout went away: exit 1 quietly, Python's convention
        _stdout_closed()
        return 1
    except PwriterError as exc:
        message = exc.message("--force") if isinstance(exc, OutputExistsError) else str(exc)
        _say(f"pwriter: error: {message}")
        shown = {_error_kind(exc)}
        for other in other_errors(exc):
            if _error_kind(other) not in shown:  # the same failure on another write says nothing new
                shown.add(_error_kind(other))
                _say(f"pwriter: also: {other}")
        return exc.exit_code
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        _say(f"pwriter: error: {_out_of_descriptors(args, exc)}")
        return 1
    except KeyboardInterrupt:
        _say("pwriter: interrupted")
        return 128 + signal.SIGINT
    except _Signalled as exc:
        _say(f"pwriter: {exc}")
        return exc.exit_code


def _command(args: argparse.Namespace) -> int:
    if args.command == "merge":
        return _merge(args)
    if args.command == "info":
        return _info(args)
    if args.command == "verify":
        return _verify(args)
    return _gen_corpus(args)


def _printable(text: str) -> str:
    """``text`` with every unprintable character (newline, ESC, ...) escaped as ``repr`` does, so that a
    file name can neither break an error line nor drive the terminal."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def _say(line: str) -> None:
    """Write one line to stderr (:func:`_printable`) in one write call (ranks under mpiexec share stderr)."""
    sys.stderr.flush()  # (what was printed before comes first)
    data = (_printable(line) + "\n").encode(sys.stderr.encoding or "utf-8", "backslashreplace")
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):  # (stderr replaced by an object without a descriptor)
        sys.stderr.write(data.decode(sys.stderr.encoding or "utf-8", "replace"))
        return
    from ..data.output import write_fully

    write_fully(fd, data)


def _stdout_closed() -> None:
    """The reader of stdout went away: what is left goes to /dev/null, so the flush at exit cannot fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _out_of_descriptors(args: argparse.Namespace, exc: OSError) -> str:
    """The one-line error for EMFILE / ENFILE (the writer has removed what it created as it unwound)."""
    import resource

    where = getattr(args, "output", None) or getattr(args, "path", None) or exc.filename or "pwriter"
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    shown_limit = "unlimited" if limit == resource.RLIM_INFINITY else str(limit)
    problem = (exc.strerror or "too many open files").lower()
    return (f"{where}: {problem} (the limit is {shown_limit}, ulimit -n): use fewer --lanes (each shard is "
            "a file) or raise the limit")


def _error_kind(error: BaseException) -> tuple[object, ...]:
    return (type(error), getattr(error, "path", None), getattr(error, "errno", None))


class _SignalPolicy:
    """What SIGINT and SIGTERM do to ``pwriter merge`` outside :func:`_cancel_on_signals`: before the
    output is published they end the command (:class:`_Signalled`); after, they are ignored (SIG_IGN, which
    the interpreter keeps to its exit), except that they end a ``--verify`` under way (exit 1)."""

    def __init__(self) -> None:
        self.published = False

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        """Put SIGINT's and SIGTERM's handlers back as they were, at the end (main() called in-process)."""
        numbers = (signal.SIGINT, signal.SIGTERM)
        previous = [signal.getsignal(number) for number in numbers]
        try:
            yield
        finally:
            self.published = False
            for number, handler in zip(numbers, previous, strict=True):
                signal.signal(number, handler)

    def install(self) -> None:
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, self._on_signal)

    def ignore(self) -> None:
        """After publishing (from the main thread, outside trio)."""
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, signal.SIG_IGN)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A signal raises :class:`_Signalled` meanwhile (``--verify``)."""
        self.published = False
        self.install()
        try:
            yield
        finally:
            self.published = True
            self.ignore()

    def _on_signal(self, number: int, frame: object) -> None:
        if self.published:
            return
        raise _Signalled(number)


_SIGNALS = _SignalPolicy()


class _Signalled(Exception):
    """SIGINT or SIGTERM arrived before the merge published: nothing is (exit 128 + the signal's number)."""

    def __init__(self, number: int) -> None:
        self.exit_code = 128 + number
        super().__init__("interrupted" if number == signal.SIGINT else "terminated")


async def _cancel_on_signals(scope: Any, signalled: list[int], *, task_status: Any) -> None:
    """Cancel ``scope`` at the first SIGINT or SIGTERM (started with ``nursery.start``: in place before
    anything is created).  SIGINT comes here too, not as a KeyboardInterrupt anywhere: a merge is
    cancelled only at checkpoints, so it ends either before its output is published, or after."""
    import trio

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for number in signals:
            signalled.append(number)
            scope.cancel()
            return


def _lanes(args: argparse.Namespace) -> str | None:
    """``--lanes``, or its old name ``--workers`` (which warns; both with different values: an error)."""
    lanes: str | None = getattr(args, "lanes", None)
    old: str | None = getattr(args, "old_workers", None)
    if old is None:
        return lanes
    from ..plan.settings import _warn_once, one_value

    _warn_once("pwriter: warning: --workers is now --lanes", stderr=True)
    given = None if lanes is None else (f"--lanes {lanes}", lanes)
    value: str = one_value("lanes", given, (f"--workers {old}", old))
    return value


def _settings(args: argparse.Namespace) -> Any:
    from ..plan.settings import load_settings

    options = ("layout", "backend", "stripe_size", "stripe_count", "shard_size", "fsync", "direct", "compress",
               "level")
    return load_settings(lanes=_lanes(args), wrap=_wrap_choice(args),
                         **{name: getattr(args, name, None) for name in options})


def _wrap_choice(args: argparse.Namespace) -> str | None:
    """``--wrap``; for a merge without it, ``auto`` unless ``PWRITER_WRAP`` says otherwise
    (the library's default is ``array``)."""
    if getattr(args, "command", None) != "merge" or args.wrap is not None:
        return getattr(args, "wrap", None)
    return None if any(name.upper() == "PWRITER_WRAP" for name in os.environ) else "auto"


def _merge(args: argparse.Namespace) -> int:
    from ..data.output import names_of_output
    from ..errors import UsageError
    from ..service.merge import MergeProgress, collect_inputs, merge

    _SIGNALS.install()
    settings = _settings(args)
    _check_recursive(args)
    to_stdout = args.output == "-"
    if args.mpi or (args.mpi is None and _under_mpi()):
        return _merge_mpi(args, settings)
    if to_stdout and args.verify:
        raise UsageError("-o -: --verify needs an output file to read back")
    if to_stdout and sys.stdout.isatty():
        raise UsageError("-o -: standard output is a terminal; redirect it to a file or a pipe")
    exclude = [] if to_stdout else names_of_output(args.output)
    inputs = collect_inputs(args.inputs, args.directory, exclude=exclude, recursive=args.recursive)
    progress = MergeProgress(total_input_bytes=0)  # (merge() measures the inputs once, and sets it)
    work = functools.partial(merge, inputs, args.output, settings=settings, force=args.force, progress=progress,
                             salvage=args.salvage, validate=args.validate, require_complete=args.require_complete)
    result = _run_merge(args, work, progress, show_progress=_progress_wanted(args))
    return _report_merge(args, settings, result, inputs)


def _check_recursive(args: argparse.Namespace) -> None:
    """``-r`` reads directories: without ``-d`` it would be ignored, so it is refused."""
    from ..errors import UsageError

    if args.recursive and not args.directory:
        raise UsageError("-r/--recursive: give the directories to read below with -d DIR")


def _progress_wanted(args: argparse.Namespace) -> bool:
    return args.progress if args.progress is not None else sys.stderr.isatty()


def _run_merge(args: argparse.Namespace, work: Any, progress: Any, *, show_progress: bool) -> Any:
    """``trio.run`` of ``await work()``, with progress on stderr and SIGINT or SIGTERM cancelling it (then
    :class:`_Signalled`; once ``work()`` has returned, a signal changes nothing); one error for a group."""
    import trio

    from ..service.writer import error_to_raise

    async def run() -> Any:
        signalled: list[int] = []
        result, done = None, False
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(_cancel_on_signals, nursery.cancel_scope, signalled)
                if show_progress:
                    nursery.start_soon(functools.partial(_show_progress, progress, tty=sys.stderr.isatty()))
                result = await work()
                done = _SIGNALS.published = True
                nursery.cancel_scope.cancel()
        except BaseException:
            if signalled and not done:  # what the cancellation made happen (an MPI rank: the others were told)
                raise _Signalled(signalled[0]) from None
            raise
        if signalled and not done:
            raise _Signalled(signalled[0])
        return result

    try:
        result = trio.run(run, strict_exception_groups=True)
    except BaseExceptionGroup as group:
        raise error_to_raise(group) from None
    _SIGNALS.ignore()  # (published: what is left is the report)
    return result


def _report_merge(args: argparse.Namespace, settings: Any, result: Any, inputs: list[str], ranks: Any = None) -> int:
    """After a published merge: the incomplete inputs' warnings, ``--verify``, the report; the exit code."""
    _warn_incomplete(result.incomplete)
    checked = None
    if args.verify:
        from ..errors import DataError
        from ..service.verify import verify

        try:
            with _SIGNALS.interruptible():
                checked = verify(args.output, inputs, salvage=args.salvage, validate=args.validate)
        except _Signalled as exc:
            raise DataError(f"{args.output}: published, but --verify was {exc} before it finished") from None
    try:
        _print_merge(args, settings, result, checked, ranks=ranks)
        sys.stdout.flush()
    except BrokenPipeError:  # the output is published (exit 1 would say not): the reader leaving changes nothing
        _stdout_closed()
    return _mismatch(args.output, checked) if checked is not None else 0


def _warn_incomplete(incomplete: Sequence[Any]) -> None:
    """One warning line per incomplete input (the first ``INCOMPLETE_SHOWN``), then a count of the rest."""
    from ..service.merge import INCOMPLETE_SHOWN

    for entry in incomplete[:INCOMPLETE_SHOWN]:
        if entry.why.startswith("salvaged: "):
            _say(f"pwriter: warning: {entry.path}: {entry.why}")
        elif entry.claimed is None:
            _say(f"pwriter: warning: {entry.path}: incomplete: {entry.why}, {entry.events} events read")
        else:
            _say(f"pwriter: warning: {entry.path}: incomplete: {entry.why}")
    if len(incomplete) > INCOMPLETE_SHOWN:
        _say(f"pwriter: warning: and {len(incomplete) - INCOMPLETE_SHOWN} more incomplete inputs "
             f"({len(incomplete)} in all; --json lists each)")


def _under_mpi() -> bool:
    from .mpi import launched_by_mpi

    return launched_by_mpi()


def _merge_mpi(args: argparse.Namespace, settings: Any) -> int:
    """``pwriter merge`` with every MPI rank: rank 0 reports; every rank exits with the same code."""
    from ..errors import PwriterError, UsageError
    from ..service.merge import MergeProgress
    from .mpi import RankTimeout, World, merge_over_ranks

    world = World(timeout=settings.mpi_timeout)
    progress = MergeProgress(total_input_bytes=0)
    work = functools.partial(merge_over_ranks, world, args.inputs, args.directory, args.output, settings=settings,
                             force=args.force, salvage=args.salvage, validate=args.validate, progress=progress,
                             offsets=args.mpi_offsets, recursive=args.recursive,
                             require_complete=args.require_complete)
    try:
        if args.output == "-":  # (every rank finds it: no agreement needed)
            raise UsageError("-o -: a merge over MPI ranks writes a file, not a stream")
        ranked = _run_merge(args, work, progress, show_progress=world.rank == 0 and _progress_wanted(args))
    except RankTimeout as exc:  # another rank hangs: no agreement, so this rank says it and ends the job
        print(f"pwriter: error: {exc}", file=sys.stderr, flush=True)
        world.abort(exc.exit_code)
    except (_Signalled, PwriterError) as exc:
        if world.rank != 0:  # rank 0 says it, once
            return exc.exit_code
        raise
    if ranked is None:
        return 0
    return _report_merge(args, settings, ranked.result, ranked.inputs, ranks=ranked)


def _print_merge(args: argparse.Namespace, settings: Any, result: Any, checked: Any, ranks: Any = None) -> None:
    stats = result.writer
    if args.json:
        io = {name: getattr(stats.io, name) for name in ("mechanism", "submissions", "enter_calls", "ops_per_enter",
                                                          "short_writes", "most_in_flight", "bytes_written")}
        report = {
            "outputs": list(stats.outputs), "manifest": result.manifest,
            **_fields(stats, "layout", "backend", "fs_kind", "stripe_size", "lanes"),
            **_fields(result, "inputs", "events", "input_bytes"),
            **_fields(stats, "bytes_written", "chunks", "writes"),
            "io": {**io, "ops_per_enter": round(io["ops_per_enter"], 3)},
            **_fields(settings, "fsync", "direct"),
            **_fields(stats, "direct_writes", "writeback_hints", "compressed"),
            "seconds": round(stats.seconds, 6),
            "validated": args.validate,
            "dropped_lines": result.dropped_lines,
            "salvaged_inputs": [path for path, _, _ in result.salvaged],
            "wrap": result.wrap,
            "incomplete": [entry.as_json() for entry in result.incomplete],
        }
        if checked is not None:
            report["verification"] = _verification_report(checked)
        if ranks is not None:
            report["ranks"] = ranks.ranks
            report["per_rank"] = ranks.per_rank
        print(json.dumps(report), file=_report_stream(args))
    else:
        rate = stats.bytes_written / stats.seconds / (1 << 20) if stats.seconds > 0 else 0.0
        where = ", ".join(stats.outputs) if not result.manifest else f"{result.manifest} ({len(stats.outputs)} shards)"
        print(_printable(
            f"merged {result.inputs} inputs, {result.events} events, {stats.bytes_written} bytes into {where} "
            f"[{stats.layout}, {stats.backend}, {stats.lanes} lanes"
            f"{_over_ranks(ranks)}] in {stats.seconds:.2f} s ({rate:.0f} MiB/s)"),
            file=_report_stream(args),
        )
        if checked is not None and checked.match:
            print(f"verified: the output holds exactly the {checked.input_events} event lines of the inputs")


def _fields(source: Any, *names: str) -> dict[str, Any]:
    """``source``'s attributes ``names``, by name (for a JSON report)."""
    return {name: getattr(source, name) for name in names}


def _over_ranks(ranks: Any) -> str:
    if ranks is None:
        return ""
    return f" over {ranks.ranks} rank{'s' if ranks.ranks != 1 else ''}"


def _report_stream(args: argparse.Namespace) -> Any:
    """Where the merge's report goes: stdout, unless the trace itself does (``-o -``)."""
    return sys.stderr if args.output == "-" else sys.stdout


def _verify(args: argparse.Namespace) -> int:
    from ..data.inputs import collect_inputs
    from ..data.output import names_of_output
    from ..service.verify import output_files

    _check_recursive(args)
    outputs = output_files(args.output)
    exclude = [*names_of_output(args.output), *outputs]
    inputs = collect_inputs(args.inputs, args.directory, exclude=exclude, recursive=args.recursive)
    return _report_verification(args.output, inputs, as_json=args.json, salvage=args.salvage,
                                validate=args.validate)


def _report_verification(output: str, inputs: list[str], *, as_json: bool, salvage: bool, validate: bool) -> int:
    """Verify, print the result (one JSON object, or a line), return the exit code."""
    from ..service.verify import verify

    checked = verify(output, inputs, salvage=salvage, validate=validate)
    if as_json:
        print(json.dumps(_verification_report(checked)))
    elif checked.match:
        print(_printable(f"verified: {output} holds exactly the {checked.input_events} event lines of "
                         f"{len(inputs)} inputs"))
    return _mismatch(output, checked)


def _verification_report(checked: Any) -> dict[str, Any]:
    return {
        "verified": checked.match,
        **_fields(checked, "output_events", "input_events", "missing", "extra"),
        "missing_examples": [line.decode("utf-8", "replace") for line in checked.missing_examples],
        "extra_examples": [line.decode("utf-8", "replace") for line in checked.extra_examples],
    }


def _mismatch(output: str, checked: Any) -> int:
    """Exit code of a verification: 0, or 1 with the one-line error on stderr."""
    if checked.match:
        return 0
    _say(f"pwriter: error: {output}: does not match its inputs: {checked.output_events} event lines against "
         f"{checked.input_events}, {checked.missing} missing, {checked.extra} extra")
    return 1


PROGRESS_EVERY_TTY = 0.5
PROGRESS_EVERY_LOG = 5.0


async def _show_progress(progress: Any, *, tty: bool) -> None:
    """Progress on stderr: a line rewritten in place on a terminal, else a line every few seconds."""
    import trio

    start = trio.current_time()
    try:
        while True:
            await trio.sleep(PROGRESS_EVERY_TTY if tty else PROGRESS_EVERY_LOG)
            _render_progress(progress, trio.current_time() - start, tty=tty)
    finally:
        _render_progress(progress, trio.current_time() - start, tty=tty)
        if tty:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _fraction(progress: Any) -> float:
    """How much of the input bytes the merge has read."""
    read: int = progress.input_bytes()
    total: int = progress.total_input_bytes
    return min(1.0, read / max(1, total))


def progress_text(progress: Any, elapsed: float, fraction: float | None = None) -> str:
    """One progress report: fraction, files done, events, text written, rate and ETA."""
    if fraction is None:
        fraction = _fraction(progress)
    text = progress.text_bytes
    rate = text / max(elapsed, 1e-9) / (1 << 20)
    if fraction >= 1.0:
        eta = "done"
    elif fraction > 0 and elapsed > 0:
        eta = "ETA " + _duration(elapsed * (1 - fraction) / fraction)
    else:
        eta = "ETA ?"
    return (f"{fraction:6.1%}  {progress.files_done}/{progress.files} files  {progress.events:,} events  "
            f"{text / (1 << 20):,.0f} MiB text  {rate:,.0f} MiB/s  {eta}")


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _render_progress(progress: Any, elapsed: float, *, tty: bool) -> None:
    fraction = _fraction(progress)
    line = progress_text(progress, elapsed, fraction)
    if tty:
        bar = "#" * int(fraction * 20)
        sys.stderr.write(f"\r[{bar:<20}] {line}\x1b[K")
    else:
        sys.stderr.write(f"pwriter: {line.strip()}\n")
    sys.stderr.flush()


def _info(args: argparse.Namespace) -> int:
    from ..data.backends import MECHANISMS, available_backends, resolve_backend_name
    from ..plan.settings import ConfigError, describe_settings, parse_size
    from ..service.writer import plan

    settings = _settings(args)
    try:
        expected = parse_size(args.size) if args.size is not None else None
    except ValueError as exc:
        raise ConfigError(f"--size {args.size!r}: {exc}") from None
    fs, sizing = plan(args.path, settings, expected_bytes=expected)
    striping = sizing.striping
    backends = available_backends()
    chosen = resolve_backend_name(settings.backend)
    members = _member_summary(args.path)
    if args.json:
        print(
            json.dumps(
                {
                    "path": args.path,
                    "fs_kind": fs.kind.value,
                    "fs_magic": hex(fs.magic),
                    **_fields(fs, "mount_point", "block_size"),
                    "fs_stripe_size": fs.stripe_size,
                    "fs_stripe_count": fs.stripe_count,
                    "ost_count": fs.ost_count,
                    "lustre_layout": None if striping is None else {
                        "stripe_count": striping.stripe_count, "stripe_size": striping.stripe_size,
                        "first_osts": list(striping.offsets), "set_by": fs.layout_setter},
                    **_fields(sizing, "layout", "lanes", "stripe_size", "buffers", "queue_depth", "write_call_size",
                              "memory_budget"),
                    "backend": chosen,
                    "reasons": list(sizing.reasons),
                    "backends": {name: {"available": why is None, "reason": why, "mechanism": MECHANISMS[name]}
                                 for name, why in backends.items()},
                    "members": members,
                    "settings": {name: {"value": value, "description": description}
                                 for name, value, description in describe_settings(settings)},
                }
            )
        )
        return 0
    print(f"path:         {_printable(args.path)}")
    print(f"filesystem:   {fs.kind.value} (magic {fs.magic:#x}) mounted at {fs.mount_point}")
    print(f"block size:   {fs.block_size}")
    print(f"fs stripes:   size {fs.stripe_size or 'unknown'}, count {fs.stripe_count or 'unknown'}")
    if fs.kind.value == "lustre":
        print(f"OSTs:         {fs.ost_count or 'unknown'}")
        if striping is None:
            print("set on create: nothing (the directory's default layout; see sizing)")
        else:
            firsts = "Lustre's choice" if set(striping.offsets) == {-1} else ", ".join(map(str, striping.offsets))
            print(f"set on create: stripe count {striping.stripe_count}, stripe size {striping.stripe_size}, "
                  f"first OST {firsts} (by {fs.layout_setter})")
    print("sizing:")
    for reason in sizing.reasons:
        print(f"  {reason}")
    print(f"backend:      {chosen}")
    if members is not None:
        print(
            f"gzip members: {members['count']} in {len(members['files'])} file(s), {members['events']} events, "
            f"{members['text_bytes']} bytes of text in {members['compressed_bytes']} (index {members['index']})"
        )
    print("settings (PWRITER_*; command-line options win):")
    rows = describe_settings(settings)
    width = max(len(name) for name, _, _ in rows)
    for name, value, description in rows:
        print(f"  {name:<{width}}  {value:<6}  {description}")
    print("backends:")
    for name, why in backends.items():
        print(f"  {name}: {'available' if why is None else 'unavailable: ' + why} ({MECHANISMS[name]})")
    return 0


def _member_summary(path: str) -> dict[str, Any] | None:
    """What the member index of a compressed output says, if it has one."""
    from ..data.output import member_index_path

    index_path = member_index_path(path)
    try:
        with open(index_path, encoding="utf-8") as handle:
            index = json.load(handle)
    except (OSError, ValueError):
        return None
    members = index.get("members", [])
    return {
        "index": index_path,
        "files": index.get("files", []),
        "count": len(members),
        "events": sum(member["events"] for member in members),
        "text_bytes": sum(member["text_length"] for member in members),
        "compressed_bytes": sum(member["length"] for member in members),
    }


def _gen_corpus(args: argparse.Namespace) -> int:
    from ..errors import OutputExistsError
    from .corpus import write_corpus

    try:
        paths = write_corpus(args.directory, files=args.files, events_per_file=args.events, seed=args.seed,
                             force=args.force)
    except FileExistsError as exc:
        raise OutputExistsError(exc.filename, "a file is already there") from None
    print(_printable(f"wrote {len(paths)} traces ({args.events} events each) to {args.directory}"))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
