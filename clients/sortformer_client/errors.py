"""Exceptions of the client library: one base class, and what a caller can act on."""
from __future__ import annotations


class DiarizationError(Exception):
    """Base class of every error the client library raises on purpose."""


class ServerUnavailable(DiarizationError):
    """The Triton server cannot be reached (not running, wrong URL/port, shutting down).

    The message always names the URL and the protocol that were tried.
    """

    def __init__(self, url: str, protocol: str, detail: str) -> None:
        self.url = url
        self.protocol = protocol
        self.detail = detail
        super().__init__(f"Triton server at {url} ({protocol}) is unavailable: {detail}")


class ModelUnavailable(DiarizationError):
    """The server is up but the preset's ensemble is not loaded or not ready."""


class StreamError(DiarizationError):
    """A request of a stream failed; ``triton_message`` is Triton's own error text when there is one.

    After a StreamError the stream cannot continue (the server-side state is unknown): the stream
    sends END (best effort) when it is closed or leaves its ``with`` block.
    """

    def __init__(self, message: str, sequence_id: int = 0, request_index: int = -1,
                 triton_status: str = "", triton_message: str = "") -> None:
        self.sequence_id = sequence_id
        self.request_index = request_index
        self.triton_status = triton_status
        self.triton_message = triton_message
        super().__init__(message)


class RequestTimeout(StreamError, TimeoutError):
    """A request got no response within the client's ``timeout``."""
