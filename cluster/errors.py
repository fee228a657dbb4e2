"""Errors raised by the engine and the cluster: each names the bad input and what was expected."""

from __future__ import annotations


class SniperError(Exception):
    """Base class of every error this package raises on purpose."""


class ModelFileError(SniperError, ValueError):
    """The model file is missing, unreadable, truncated, corrupt, or not a Mixture-of-Experts GGUF."""


class OutputFileError(SniperError, OSError):
    """An output file cannot be written: its directory cannot hold a new file (missing, not
    writable, not a directory) or writing it failed (the disk is full)."""


class CacheBudgetError(SniperError, ValueError):
    """The expert-cache budget cannot work for this model (it cannot hold one layer's largest top-k experts)."""


class InvalidParameterError(SniperError, ValueError):
    """A request or configuration parameter is out of range or of the wrong type.

    Attributes:
        param: the name of the bad parameter, when one can be named (the HTTP layer reports it
            as the error's ``param``).
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self) -> tuple[object, ...]:  # crosses Ray's process boundaries with its param
        return (type(self), (str(self), self.param))


class ChatTemplateError(InvalidParameterError):
    """A conversation cannot be rendered with the chat template (the template raised, or the
    model has no template for what was asked, such as tools)."""


class TemplateLimitError(ChatTemplateError):
    """A chat template took longer, wrote more or needed more memory than a rendering may
    (``cluster.engine.template_render``)."""


class PromptTooLongError(SniperError, ValueError):
    """The prompt does not fit in the context window."""


class EngineClosedError(SniperError, RuntimeError):
    """The engine was closed and cannot serve requests any more."""


class WarmthFormatError(SniperError, ValueError):
    """A warmth report could not be decoded: wrong version, shape or type."""


class OverloadedError(SniperError, RuntimeError):
    """Every queue that could take the request is full; retry later."""


class NodeFailedError(SniperError, RuntimeError):
    """The node serving a stream died after it had sent text."""


class NoNodesError(SniperError, RuntimeError):
    """No live node is registered with the router (or there is no deployment)."""


class RouterUnavailableError(SniperError, RuntimeError):
    """The router did not answer within the time a restart takes (it is gone, or restarting for
    longer than the caller waits); nothing was started."""
