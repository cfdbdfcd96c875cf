"""The bench's one error type, in a module of its own so that every bench module can raise it."""

from __future__ import annotations


class SuiteError(ValueError):
    """A suite cannot be loaded or cannot run here; the message says what is wrong or missing."""
