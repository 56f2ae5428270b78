"""Error types that cross boundaries: every bad request becomes a RequestError with a stable code."""

from __future__ import annotations


class RequestError(ValueError):
    """A request that cannot be served; `code` is stable and part of the protocol.

    Codes: invalid_request, invalid_params, empty_prompt, prompt_too_long,
    invalid_utf8, payload_too_large, deadline_exceeded, entry_deleted, internal.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class ModelSourceError(RuntimeError):
    """A model source that cannot be resolved; the message says what to do."""
