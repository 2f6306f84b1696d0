"""Which inputs of a merge are incomplete (pure: no I/O).

Facts about DFTracer 2.x traces this rests on:

* Every process that finalizes its tracer ends its file with an ``end``
  event (``"name":"end","cat":"dftracer"``) whose ``args.num_events`` is
  the number of events with an ``id`` written before it; its own ``id`` is
  ``num_events + 1``.  The metadata lines (host and file hashes, about 15
  per file) carry no ``id``.
* The tracer writes ``id`` as the first key of an event, so an event that
  ``num_events`` counts is an event line that begins with ``{"id":``
  (:data:`~pwriter.plan.traceformat.ID_PREFIX`).  That is the rule used here:
  it needs no JSON parsing, and the C scanner counts such lines as it
  cleans (:class:`~pwriter.plan.traceformat.BlockCleaner`).  An event that
  carries ``id`` elsewhere than first is not counted.
* A process that never finalizes (PyTorch data-loader workers, ``exec``,
  containers, a crash) leaves an empty file, or one cut short without its
  ``end`` event.
* Older traces (DFTracer 1.x, array style) have no ``end`` event at all.

So an input is *incomplete* when it is empty (no event at all), when
``--salvage`` dropped part of it, when it ends with an ``end`` event whose
``num_events`` differs from the events read, or when it has no ``end``
event as its last event while another input of the same merge has one.
When no input of a merge ends with an ``end`` event (a format without
them), a missing one is not reported.  Only the last event line of each
input is parsed.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

from .traceformat import ID_PREFIX

__all__ = ["InputEnd", "Incomplete", "end_event_claim", "input_end", "incomplete_inputs"]


@dataclasses.dataclass(frozen=True)
class InputEnd:
    """What a merge learned about how one input ends."""

    path: str
    events: int
    """Event lines read (every one the merge wrote)."""
    counted: int
    """Event lines read that ``num_events`` counts: those beginning ``{"id":``, the ``end`` event excluded."""
    claimed: int | None
    """``num_events`` of the ``end`` event the input ends with; None when its last event is not one."""
    damage: str | None = None
    """What ``--salvage`` dropped from it, if anything."""


@dataclasses.dataclass(frozen=True)
class Incomplete:
    """One incomplete input: ``why`` is ``"no end event"``, ``"num_events N,
    read M"`` or ``"salvaged: ..."``; ``events`` the events read that
    ``num_events`` counts, ``claimed`` the ``num_events`` of its ``end``
    event (None without one)."""

    path: str
    why: str
    events: int
    claimed: int | None

    def as_json(self) -> dict[str, object]:
        return {"path": self.path, "why": self.why, "events": self.events, "claimed": self.claimed}


def end_event_claim(line: bytes | None) -> int | None:
    """``args.num_events`` when ``line`` is a DFTracer ``end`` event, else None."""
    if line is None or b'"num_events"' not in line or b'"end"' not in line:
        return None
    try:
        event = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(event, dict) or event.get("name") != "end" or event.get("cat") != "dftracer":
        return None
    args = event.get("args")
    claimed = args.get("num_events") if isinstance(args, dict) else None
    if type(claimed) is not int or claimed < 0:
        return None
    return claimed


def input_end(path: str, *, events: int, ids: int, last_event: bytes | None, damage: str | None = None
              ) -> InputEnd:
    """The :class:`InputEnd` of an input read whole: ``events`` event lines,
    ``ids`` of them beginning ``{"id":``, the last one ``last_event``."""
    claimed = end_event_claim(last_event)
    counted = ids
    if claimed is not None and last_event is not None and last_event.startswith(ID_PREFIX):
        counted -= 1  # (the end event's own id)
    return InputEnd(path, events, counted, claimed, damage)


def incomplete_inputs(ends: Sequence[InputEnd]) -> list[Incomplete]:
    """The incomplete inputs among ``ends`` (every input of one merge), in
    their order (see the module docstring for the rules)."""
    any_end_event = any(end.claimed is not None for end in ends)
    found = []
    for end in ends:
        if end.damage:
            why = f"salvaged: {end.damage}"
        elif end.events == 0 or (end.claimed is None and any_end_event):
            why = "no end event"
        elif end.claimed is not None and end.claimed != end.counted:
            why = f"num_events {end.claimed}, read {end.counted}"
        else:
            continue
        found.append(Incomplete(end.path, why, end.counted, end.claimed))
    return found
