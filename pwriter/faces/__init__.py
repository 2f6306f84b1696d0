"""The faces: the command line, the sync API, MPI ranks, the test doubles and fixtures.

Each is a way in to :mod:`pwriter.service`; none is imported by the planes below."""
