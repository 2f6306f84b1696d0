"""The pure decisions: plain values in, plain values out; no trio, no I/O.

Layout planners, sizing policy, settings, the trace format and input completeness.
Imports nothing of pwriter but :mod:`pwriter.errors`."""
