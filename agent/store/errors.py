"""What the store raises: one exception type for callers, with the ones they tell apart."""

from __future__ import annotations


class StoreError(Exception):
    """The database cannot be opened, migrated or written; or a job is not held by its caller."""


class SchemaError(StoreError):
    """The database's schema is not the one this code runs: older (only `dirigo run` and
    `dirigo migrate` bring it up to date) or newer (written by a newer Dirigo)."""


class JobStateError(StoreError):
    """An operator asked for a job that does not exist, or for a change its state forbids."""


class LeaseLost(StoreError):
    """A worker wrote on behalf of a job whose lease it no longer holds (an operator cancelled
    the job, or its lease expired and the agent requeued it); nothing was written."""
