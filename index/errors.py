"""Errors that map onto the API's status strings.

Each carries the HTTP status and the envelope's ``status`` string, so the ingress turns any of them
into a response without a lookup table. The constructor arguments are kept as ``args`` and the message
is derived from them by ``describe``: that is what lets them pickle (Exception's own ``__reduce__``
calls the class with ``args`` again) and cross Ray's process boundaries intact.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base class: an error the client is told about with a clear message."""

    status = "INTERNAL_ERROR"
    http_status = 500

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.message = self.describe(*args)

    def describe(self, *args: Any) -> str:
        return str(args[0]) if args else self.status

    def __str__(self) -> str:
        return self.message


class InvalidParameter(ServiceError, ValueError):
    status = "INVALID_PARAMETER"
    http_status = 400


class ModeNotSupported(ServiceError):
    status = "MODE_NOT_SUPPORTED"
    http_status = 400


class PayloadTooLarge(ServiceError):
    status = "PAYLOAD_TOO_LARGE"
    http_status = 413


class Overloaded(ServiceError):
    status = "OVERLOADED"
    http_status = 503


class Unavailable(ServiceError):
    """A deployment the request needs has no running replica (not scheduled yet, or all died)."""

    status = "UNAVAILABLE"
    http_status = 503


class LibraryNotFound(ServiceError):
    status = "LIBRARY_NOT_FOUND"
    http_status = 404

    def describe(self, name: str) -> str:  # type: ignore[override]
        return f"library {name!r} does not exist"


class ImageNotFound(ServiceError):
    status = "IMAGE_NOT_FOUND"
    http_status = 404

    def describe(self, library: str, image_id: str, image_uri: str | None = None) -> str:  # type: ignore[override]
        what = f"image_id {image_id!r}" + (f" with image_uri {image_uri!r}" if image_uri is not None else "")
        return f"{what} is not in library {library!r}"


class TaskNotFound(ServiceError):
    status = "TASK_NOT_FOUND"
    http_status = 404

    def describe(self, task_id: str) -> str:  # type: ignore[override]
        return f"task {task_id!r} does not exist"


class LibraryAlreadyExists(ServiceError):
    status = "LIBRARY_ALREADY_EXISTS"
    http_status = 409

    def describe(self, name: str) -> str:  # type: ignore[override]
        return f"library {name!r} already exists"


class LibraryLimitReached(ServiceError):
    status = "INVALID_PARAMETER"
    http_status = 400

    def describe(self, limit: int) -> str:  # type: ignore[override]
        return f"this deployment already holds its maximum of {limit} libraries (limits.max_libraries)"


class ModelMismatch(ServiceError):
    """The library was built with another model than the one this deployment serves."""

    status = "MODEL_MISMATCH"
    http_status = 409

    def describe(self, name: str, library_model: str, served_model: str) -> str:  # type: ignore[override]
        return (
            f"library {name!r} was built with model {library_model!r} but this deployment serves "
            f"{served_model!r}; vectors of different models cannot be compared"
        )


# Bad image input, raised below the edge (decoding, fetching); the ingress maps them to 413 and 400.


class ImageDecodeError(ValueError):
    """The bytes are not a readable image of an accepted format (truncated, corrupt, or not an image)."""


class ImageTooLarge(ValueError):
    """The payload or the image's pixel count is over the configured limit."""
