"""Domain exceptions. They carry an HTTP status and an OpenAI error type so the
HTTP edges can turn any of them into one envelope, and the CLI into one line."""

from __future__ import annotations


class SswError(Exception):
    status = 500
    type = "internal_error"
    code: str | None = None
    param: str | None = None  # the request field at fault, where one is
    details: list[dict[str, object]] | None = None  # more than one message can say (a file's bad lines)

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(SswError):
    status = 500
    type = "config_error"


class BadRequest(SswError):
    status = 400
    type = "invalid_request_error"


class ClientLeft(SswError):
    """The client went away while its request was held: nothing is sent to anyone."""

    status = 499  # nginx's "client closed request": for the access log and metrics only
    type = "invalid_request_error"
    code = "client_disconnected"


class PayloadTooLarge(SswError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RequestTimeout(SswError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class HeadersTooLarge(SswError):
    status = 431
    type = "invalid_request_error"
    code = "headers_too_large"


class TooManyRequests(SswError):
    status = 429
    type = "rate_limit_error"
    code = "too_many_requests"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class WouldEvict(SswError):
    """A batch load that would evict a model in interactive use: the batch waits."""

    status = 409
    type = "invalid_request_error"
    code = "would_evict_interactive"


class ModelNotFound(SswError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, name: str, known: list[str]) -> None:
        shown = ", ".join(known) if known else "none"
        super().__init__(f"The model '{clip(name)}' does not exist. Available models and aliases: {shown}.")
        self.name = clip(name)
        self.known = known


class NotServed(SswError):
    """A route the model cannot serve (an embedding model asked for a chat)."""

    status = 400
    type = "invalid_request_error"
    code = "unsupported_route"


class ResponseNotFound(SswError):
    status = 404
    type = "invalid_request_error"
    code = "response_not_found"


class JobNotFound(SswError):
    status = 404
    type = "invalid_request_error"
    code = "job_not_found"


class WorkerNotFound(SswError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_loaded"


class ModelBusy(SswError):
    status = 409
    type = "invalid_request_error"
    code = "model_busy"


class NoSpace(SswError):
    status = 507
    type = "insufficient_storage"
    code = "insufficient_storage"


class NoCapacity(SswError):
    status = 503
    type = "capacity_error"
    code = "no_capacity"


class SwapDeferred(NoCapacity):
    """Room exists only by evicting a worker that more urgent requests wait for: the
    load waits for them (placement.swap_wait_s) instead of swapping under them."""

    code = "swap_deferred"


class LoadFailed(SswError):
    status = 503
    type = "load_failed"
    code = "load_failed"

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @classmethod
    def cooling_down(cls, model: str, seconds_left: float, why: str) -> LoadFailed:
        """The refusal of a model in its failed-load cooldown (the loader's and the gateway's)."""
        return cls(
            f"'{model}' failed to load and is refused for {seconds_left:.0f} s more: {why}",
            retry_after_s=max(int(seconds_left + 0.999), 1),
        )


class ModelLoading(SswError):
    """The model is not ready yet; carries how long the client should wait."""

    status = 503
    type = "model_loading"
    code = "model_loading"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        # With gateway.not_loaded 'accept': the 202 body to answer with instead.
        self.accepted: dict[str, object] | None = None


class DeadlineUnmet(SswError):
    """The model cannot be ready within the request's deadline: its load (or wake) goes on,
    and the client learns when it should be ready."""

    status = 503
    type = "deadline_exceeded"
    code = "deadline_exceeded"

    def __init__(self, model: str, eta_s: float, deadline_ms: int) -> None:
        super().__init__(
            f"model '{model}' is not ready and will not be within this request's deadline of {deadline_ms} ms "
            f"(ready in about {eta_s:.1f} s; it is loading)"
        )
        self.eta_s = eta_s
        self.retry_after_s = max(1, int(eta_s + 0.999))


class UpstreamError(SswError):
    status = 502
    type = "upstream_error"
    code = "upstream_unavailable"


class SystemdError(SswError):
    status = 500
    type = "systemd_error"


class MetricsUnavailable(SswError):
    status = 503
    type = "metrics_unavailable"
    code = "metrics_unavailable"


class LoaderUnavailable(SswError):
    status = 503
    type = "loader_unavailable"
    code = "loader_unavailable"


def clip(text: str, limit: int = 80) -> str:
    """Echo at most a short, printable prefix of client text in messages."""
    printable = "".join(ch if ch.isprintable() else "?" for ch in text[:limit])
    return printable + ("…" if len(text) > limit else "")
