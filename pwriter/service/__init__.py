"""The service: a writer's lifecycle from a plan, its producer handles and lanes, merge and verify.

Imports :mod:`pwriter.plan` and :mod:`pwriter.data`."""
