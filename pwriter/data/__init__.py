"""The data plane: where bytes are read, gzipped, placed and written.

Inputs, the chunk sink (the one way every chunk goes out), gzip members, outputs and
their publication, filesystem detection, and the backends.  Imports only :mod:`pwriter.plan`."""
