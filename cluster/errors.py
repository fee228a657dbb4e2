"""Errors raised by the engine and the cluster: each names the bad input and what was expected."""

from __future__ import annotations


class SniperError(Exception):
    """Base class of every error this package raises on purpose."""


class ModelFileError(SniperError, ValueError):
    """The model file is missing, unreadable, truncated, corrupt, or not a Mixture-of-Experts GGUF."""


class CacheBudgetError(SniperError, ValueError):
    """The expert-cache budget cannot work for this model (it cannot hold one layer's largest top-k experts)."""


class InvalidParameterError(SniperError, ValueError):
    """A request or configuration parameter is out of range or of the wrong type."""


class PromptTooLongError(SniperError, ValueError):
    """The prompt does not fit in the context window."""


class EngineClosedError(SniperError, RuntimeError):
    """The engine was closed and cannot serve requests any more."""


class WarmthFormatError(SniperError, ValueError):
    """A warmth report could not be decoded: wrong version, shape or type."""
