"""Errors that cross component boundaries.

`InvalidRequestError` is what the engine raises for bad input before it allocates anything; the
gateway turns it into an OpenAI-shaped 400 whose `param` names the offending field.
"""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request that can never be served as given (bad parameter, too long, unknown token)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __repr__(self) -> str:
        return f"InvalidRequestError({self.message!r}, param={self.param!r})"


class ModelLoadError(RuntimeError):
    """A model directory that cannot be loaded: names the file or field that is wrong."""
