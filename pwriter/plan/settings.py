"""User-facing settings: one pydantic model, read from ``PWRITER_*``.

Every field may be left at its default, in which case :mod:`pwriter.plan.sizing`
derives a value from the filesystem and the machine.  Explicit values (from
the environment, the command line or the library call) always win.

Sizes accept a plain number of bytes or a number with a binary unit:
``"4MiB"``, ``"4M"``, ``"4MB"`` and ``"4 mib"`` all mean 4 x 1024 x 1024 bytes
(HPC tools such as ``lfs setstripe -S 4M`` and mpifileutils use binary units
whatever the spelling, and so do we).
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from ..errors import UsageError
from .layout import LayoutName

__all__ = ["ConfigError", "LayoutChoice", "BackendName", "WrapChoice", "Settings", "parse_size", "load_settings",
           "settings_with",
           "settings_from", "describe_settings"]

LayoutChoice = Literal["auto", LayoutName]  # (the layouts themselves: pwriter.plan.layout.LayoutName)
BackendName = Literal["auto", "io_uring", "threads"]
WrapChoice = Literal["auto", "array", "none"]

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNIT = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class ConfigError(UsageError, ValueError):
    """A setting has an invalid value; ``str()`` is one line naming the field."""


def parse_size(value: object) -> int:
    """Return a size in bytes from an int or a string such as ``"4MiB"``.

    Raises ValueError with a message saying what is accepted.
    """
    if isinstance(value, bool):
        raise ValueError("expected a size such as 4MiB, got a boolean")
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(str(value))
    if match is None:
        raise ValueError(f"cannot read {value!r} as a size (examples: 4MiB, 1M, 512KB, 65536)")
    number, unit, suffix = match.groups()
    if suffix and suffix.lower() == "b" and not unit:
        return int(number)  # "4096B"
    return int(number) * _UNIT[unit.lower()]


def _is_auto(value: object) -> bool:
    return isinstance(value, str) and value.strip().lower() in ("", "auto")


def _optional_size(value: object) -> int | None:
    return None if value is None or _is_auto(value) else parse_size(value)


def _optional_int(value: object) -> object:
    return None if _is_auto(value) else value


# An optional size or count: "auto", "" or None mean "let the sizing decide".
StripeSize = Annotated[Annotated[int, Field(ge=64 << 10)] | None, BeforeValidator(_optional_size)]
MemoryBudget = Annotated[Annotated[int, Field(ge=16 << 20)] | None, BeforeValidator(_optional_size)]
LaneCount = Annotated[Annotated[int, Field(ge=1, le=1024)] | None, BeforeValidator(_optional_int)]
BuffersPerLane = Annotated[Annotated[int, Field(ge=2, le=64)] | None, BeforeValidator(_optional_int)]
ShardSize = Annotated[Annotated[int, Field(ge=1)] | None, BeforeValidator(_optional_size)]
WriteCallSize = Annotated[Annotated[int, Field(ge=4096)] | None, BeforeValidator(_optional_size)]


def _stripe_count(value: object) -> object:
    if _is_auto(value):
        return "auto"
    try:
        count = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        count = None
    if isinstance(value, bool) or count is None or not -1 <= count <= 65534:
        raise ValueError("expected auto, -1 (every OST), 0 (the directory's default) or a count from 1 to 65534")
    return count


# The Lustre stripe count set on create (see _stripe_count for the values).
StripeCount = Annotated[Literal["auto"] | int, BeforeValidator(_stripe_count)]
OptionalBool = Annotated[bool | None, BeforeValidator(_optional_int)]  # "auto", "" or None: decided by the output
QueueDepth = Annotated[Annotated[int, Field(ge=1, le=4096)] | None, BeforeValidator(_optional_int)]


ENV_PREFIX = "PWRITER_"


class Settings(BaseModel):
    """How pwriter writes; ``None`` means "let the sizing policy decide".

    Build it with :func:`load_settings`, which also reads every field from
    the environment as ``PWRITER_<FIELD>``, for example
    ``PWRITER_STRIPE_SIZE=8MiB`` or ``PWRITER_LAYOUT=sharded``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    layout: LayoutChoice = Field(
        default="auto", description="striped, padded-striped or sharded; auto follows the filesystem")
    backend: BackendName = Field(
        default="auto", description="io_uring or threads; auto picks io_uring where it can run")
    stripe_size: StripeSize = Field(
        default=None, description="bytes per stripe buffer and slot (e.g. 4MiB); auto follows the filesystem")
    stripe_count: StripeCount = Field(
        default="auto",
        description="Lustre: OSTs each new output file is striped over (-1 all, 0 the directory's default); "
                    "auto stripes large outputs over all OSTs and shards over one each")
    lanes: LaneCount = Field(
        default=None, description="write lanes (the number of shards when sharded); auto follows the filesystem")
    shard_size: ShardSize = Field(
        default=None,
        description="sharded layout: a lane starts a new shard once its shard holds this many bytes of event "
                    "lines (e.g. 256MiB; whole lines, the last may cross it); each shard is a complete trace. "
                    "auto: one shard per lane, no limit")
    buffers_per_lane: BuffersPerLane = Field(
        default=None, description="stripe buffers per lane (default 4, cut to the memory budget)")
    queue_depth: QueueDepth = Field(
        default=None, description="fsyncs in flight at once (io_uring entries, or threads); each write is made "
                                  "in the thread that made its chunk")
    write_call_size: WriteCallSize = Field(
        default=None,
        description="most bytes one write system call carries, a multiple of 4 KiB (default 512 KiB; "
                    "one stripe with direct)")
    fsync: bool = Field(default=True, description="fsync the output and its directory before publishing")
    early_writeback: bool = Field(
        default=True, description="with fsync: start writing each written range back at once, so that "
                                  "writing and flushing overlap")
    direct: bool = Field(default=False, description="write whole stripes with O_DIRECT (padded-striped)")
    compress: OptionalBool = Field(
        default=None, description="write gzip members; auto: when the output name ends in .gz (false with such "
                                  "a name is refused)")
    wrap: WrapChoice = Field(
        default="array",
        description="array: a [ line before the events and a ] line after them; none: plain NDJSON; auto (a "
                    "merge only; the command line's default): array when an input is array style")
    level: int = Field(
        default=1, ge=0, le=9,
        description="compression level: 0 to 3 with python-isal, else zlib's 1 to 9 (another is refused)")
    memory_budget: MemoryBudget = Field(
        default=None, description="most bytes of stripe buffers (default: a quarter of available memory, "
                                  "at most 256 MiB)")
    max_delay: float = Field(
        default=1.0, gt=0, le=3600,
        description="longest time in seconds (trio clock) a written line may wait in a buffer")
    mpi_timeout: float = Field(
        default=3600, gt=0,
        description="MPI: longest time in seconds a rank waits for the others at one step of the merge; "
                    "past it one of them hangs, and the job is aborted")


def describe_settings(settings: Settings | None = None) -> list[tuple[str, str, str]]:
    """``(PWRITER_<NAME>, value, description)`` for every setting (the
    values of ``settings``, or the defaults), for ``pwriter info`` and
    ``pwriter merge --help``."""
    rows = []
    for name, field in Settings.model_fields.items():
        value = getattr(settings, name) if settings is not None else field.default
        shown = "auto" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        rows.append((ENV_PREFIX + name.upper(), shown, field.description or ""))
    return rows


def load_settings(**overrides: Any) -> Settings:
    """Build :class:`Settings` from the environment plus ``overrides``.

    ``overrides`` whose value is ``None`` are ignored, so that command-line
    options that were not given fall back to the environment.  Variable
    names are not case-sensitive; ``PWRITER_*`` variables that name no
    field are ignored.  Raises :class:`ConfigError` with one line naming the
    first bad field (and the variable, when the value came from one).
    Old names (:data:`OLD_NAMES`: ``workers``, ``PWRITER_WORKERS``) still
    work and warn once per process; an old and a new name with different
    values is a :class:`ConfigError`.

    (Our own few lines rather than pydantic-settings: that package's import
    adds start-up time to every command, which a short merge notices.)
    """
    overrides = _renamed(overrides)
    from_environment: dict[str, tuple[str, str]] = {}
    old_environment: dict[str, tuple[str, str]] = {}
    for variable, value in os.environ.items():
        name = variable[len(ENV_PREFIX) :].lower() if variable.upper().startswith(ENV_PREFIX) else ""
        if name in OLD_NAMES:
            _warn_once(f"pwriter: warning: {variable} is now {ENV_PREFIX}{OLD_NAMES[name].upper()}", stderr=True)
            old_environment[OLD_NAMES[name]] = (variable, value)
        elif name in Settings.model_fields:
            from_environment[name] = (variable, value)
    for name, (variable, value) in old_environment.items():
        new = from_environment.get(name)
        shown = None if new is None else (f"{new[0]}={new[1]!r}", new[1])
        one_value(name, shown, (f"{variable}={value!r}", value))  # (both names: the same value, or an error)
        from_environment.setdefault(name, (variable, value))
    given: dict[str, Any] = {name: value for name, (_, value) in from_environment.items()}
    given.update({name: value for name, value in overrides.items() if value is not None})
    try:
        return Settings(**given)
    except ValidationError as exc:
        variables = {name: variable for name, (variable, _) in from_environment.items()
                     if overrides.get(name) is None}  # the values that did come from the environment
        raise ConfigError(_describe(exc, variables)) from None


def settings_with(settings: Settings, **overrides: Any) -> Settings:
    """``settings`` with the ``overrides`` that are not ``None`` replaced,
    validated like :func:`load_settings` (a bad value is a :class:`ConfigError`)."""
    overrides = _renamed(overrides)
    given = {name: value for name, value in overrides.items() if value is not None}
    if not given:
        return settings
    try:
        # (only what was set is carried over, so that the copy knows, as the
        # original does, which settings were given: model_fields_set)
        return Settings(**{**settings.model_dump(exclude_unset=True), **given})
    except ValidationError as exc:
        raise ConfigError(_describe(exc, {})) from None


def settings_from(settings: Settings | None, overrides: dict[str, Any], function: str) -> Settings:
    """The one rule of every entrance that takes settings (``open_writer``,
    ``merge``, their sync faces, the pytest fixture): ``settings`` (default:
    :func:`load_settings`, the environment) with any setting given as a
    keyword on top (``None``: not given).  A keyword that names no setting is
    a TypeError naming it, as Python's own for an unexpected keyword."""
    overrides = _renamed(overrides)
    for name in overrides:
        if name not in Settings.model_fields:
            raise TypeError(f"{function}() got an unexpected keyword argument {name!r} (neither one of its own "
                            f"nor a setting: {', '.join(Settings.model_fields)})")
    if settings is None:
        return load_settings(**overrides)
    if not isinstance(settings, Settings):
        raise TypeError(f"{function}(): settings must be a pwriter.Settings (see load_settings), "
                        f"not {type(settings).__name__}")
    return settings_with(settings, **overrides)


OLD_NAMES = {"workers": "lanes", "buffers_per_worker": "buffers_per_lane"}
"""Old names of settings that still work (keyword ``workers=``, ``PWRITER_WORKERS``, ``--workers``) and
warn once per process."""

_warned: set[str] = set()


def _warn_once(message: str, *, stderr: bool) -> None:
    """Say ``message`` once per process: a line on standard error (an old
    variable or option name), else a FutureWarning (an old keyword)."""
    if message in _warned:
        return
    _warned.add(message)
    if stderr:
        print(message, file=sys.stderr)
    else:
        warnings.warn(message, FutureWarning, stacklevel=4)


def one_value(name: str, given: tuple[str, Any] | None, old: tuple[str, Any]) -> Any:
    """The value of setting ``name`` given under its old name (``old``) and
    perhaps under its own (``given``), each as ``(how it was given, value)``:
    both with different values (strings compared stripped) is a :class:`ConfigError`."""
    if given is None:
        return old[1]
    if _stripped(given[1]) != _stripped(old[1]):
        raise ConfigError(f"invalid setting {name}: {given[0]} and {old[0]} (its old name) differ")
    return given[1]


def _stripped(value: object) -> object:
    return value.strip() if isinstance(value, str) else value


def _renamed(overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` with each old name of a setting (:data:`OLD_NAMES`) put
    under the new one, warning once per old name (see :func:`one_value`)."""
    renamed = {name: value for name, value in overrides.items() if name not in OLD_NAMES}
    for old, new in OLD_NAMES.items():
        value = overrides.get(old)
        if value is None:
            continue
        _warn_once(f"pwriter: the setting {old}= is now {new}= (the old name still works)", stderr=False)
        given = renamed.get(new)
        shown = None if given is None else (f"{new}={given!r}", given)
        renamed[new] = one_value(new, shown, (f"{old}={value!r}", value))
    return renamed


def _describe(exc: ValidationError, variables: dict[str, str]) -> str:
    error = exc.errors(include_url=False)[0]
    field = ".".join(str(part) for part in error["loc"]) or "settings"
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    source = f" (from {variables[field]})" if field in variables else ""
    shown = error.get("input")
    if isinstance(shown, (str, int, float)) and not isinstance(shown, bool):
        return f"invalid setting {field}={shown!r}{source}: {message}"
    return f"invalid setting {field}{source}: {message}"
