"""The ``estuary`` command line: one console script, one sub-command group per role."""
