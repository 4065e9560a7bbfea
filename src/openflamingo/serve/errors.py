"""The OpenAI error shape: every refused request is `{"error": {"message", "type", "param", "code"}}` + a 4xx."""

from __future__ import annotations


class ApiError(Exception):
    """A request the server refuses; `param` names the offending field (e.g. "messages[1].content[0]")."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code
        self.kind = kind
        self.headers = headers  # e.g. Retry-After on a 429

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
