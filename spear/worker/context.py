"""What a handler learns about its invocation: ids, deadline, content types, a logger."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

from spear.worker_protocol import DEFAULT_CONTENT_TYPE, Request

if TYPE_CHECKING:  # logging loads lazily: most handlers never log, and workers start faster
    import logging

_LOG_FORMAT = "%(asctime)s %(levelname)s [%(execution_id)s] %(message)s"
_logger: logging.Logger | None = None


def _function_logger() -> logging.Logger:
    """The logger handlers write through: stderr, which the host captures as the call's logs."""
    global _logger
    import logging

    if _logger is None:
        _logger = logging.getLogger("spear.worker.function")
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        _logger.addHandler(handler)
        _logger.setLevel(logging.INFO)
        _logger.propagate = False
    return _logger


class Context:
    """One invocation as its handler sees it.

    Attributes:
        execution_id: the platform's id of this execution (also in every log line).
        content_type: the content type of the input.
        deadline: `time.monotonic()` value past which the host kills this worker.
        response_content_type: the content type of the output; a handler may set it.
        cancelled: True once the host abandoned this request (a long handler may poll it).
    """

    __slots__ = (
        "_logger",
        "cancelled",
        "content_type",
        "deadline",
        "execution_id",
        "response_content_type",
    )

    def __init__(self, *, execution_id: str, content_type: str, deadline: float) -> None:
        self.execution_id = execution_id
        self.content_type = content_type
        self.deadline = deadline
        self.response_content_type = DEFAULT_CONTENT_TYPE
        self.cancelled = False
        self._logger: logging.LoggerAdapter[logging.Logger] | None = None

    @classmethod
    def for_request(cls, request: Request) -> Context:
        """The context of `request`, its deadline counted from now."""
        return cls(
            execution_id=request.execution_id,
            content_type=request.content_type,
            deadline=time.monotonic() + request.deadline_ms / 1000,
        )

    def remaining_s(self) -> float:
        """Seconds left before the deadline (negative once it passed)."""
        return self.deadline - time.monotonic()

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger writing to stderr, each line tagged with the execution id."""
        if self._logger is None:
            import logging

            extra = {"execution_id": self.execution_id}
            self._logger = logging.LoggerAdapter(_function_logger(), extra)
        return self._logger
