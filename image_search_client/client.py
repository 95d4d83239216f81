"""A typed Python client for the image-search REST API (``docs/API.md``).

Every route of the contract has a method; answers are pydantic models; an error envelope raises an
:class:`ImageSearchError` subclass chosen by the envelope's ``status`` string and carrying ``status``,
``message`` and ``http_status``. The client is safe to share between threads (one ``requests.Session``
per thread, so connection pools are reused without sharing a session across threads).

    from image_search_client import ImageSearchClient
    client = ImageSearchClient("http://127.0.0.1:8000", api_key="...")
    client.create_library("shop_a_tops")
    client.add_image("shop_a_tops", "img001", "https://example.com/img001.jpg", image="img001.jpg",
                     tags={"color": "white"})
    for hit in client.search_by_text("shop_a_tops", "a white T-shirt", top_k=5):
        print(hit.score, hit.image_id, hit.tags)
"""

from __future__ import annotations

import base64
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal
from urllib.parse import quote

import requests
from pydantic import BaseModel, ConfigDict, Field
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

PREFIX = "/api/v1/operators/image-search"
DEFAULT_URL = "http://127.0.0.1:8000"

Mode = Literal["general_search", "item_search", "adaptive_search"]
TagValue = str | int | float | bool | list[str | int | float | bool]
#: An image given to the client: raw bytes, or the path of a file to read.
ImageInput = bytes | str | os.PathLike[str]

#: Answers retried (with the connection failures): the service shed the request (503 ``OVERLOADED``, or a
#: proxy's 503 in front of it) or a proxy rate-limited it (429).
RETRY_STATUSES = frozenset({429, 503})

#: Import-task states after which a task changes no more.
TERMINAL_TASK_STATES = frozenset({"SUCCEEDED", "PARTIALLY_SUCCEEDED", "FAILED", "CANCELLED"})


# -- errors ----------------------------------------------------------------------------------------


class ImageSearchError(Exception):
    """The service answered with an error envelope (or with something that is not an envelope).

    Attributes:
        status: the envelope's status string, e.g. ``"LIBRARY_NOT_FOUND"``.
        message: the envelope's message (names the offending field).
        http_status: the HTTP status code.
        data: the envelope's ``data`` (normally ``None`` on errors).
    """

    def __init__(self, status: str, message: str, http_status: int, data: Any = None) -> None:
        super().__init__(f"{status} (HTTP {http_status}): {message}")
        self.status = status
        self.message = message
        self.http_status = http_status
        self.data = data


class InvalidParameterError(ImageSearchError):
    """400 ``INVALID_PARAMETER``: the request is malformed; the message names the field."""


class ModeNotSupportedError(ImageSearchError):
    """400 ``MODE_NOT_SUPPORTED``: e.g. a text search on a library that is not ``general_search``."""


class UnauthorizedError(ImageSearchError):
    """401 ``UNAUTHORIZED``: the service wants an API key and none (or a wrong one) was sent."""


class NotFoundError(ImageSearchError):
    """Base of the 404 errors."""


class LibraryNotFoundError(NotFoundError):
    """404 ``LIBRARY_NOT_FOUND``."""


class ImageNotFoundError(NotFoundError):
    """404 ``IMAGE_NOT_FOUND``."""


class TaskNotFoundError(NotFoundError):
    """404 ``TASK_NOT_FOUND``."""


class RouteNotFoundError(NotFoundError):
    """404 ``NOT_FOUND``: the service has no such route (e.g. an older service without import tasks)."""


class MethodNotAllowedError(ImageSearchError):
    """405 ``METHOD_NOT_ALLOWED``."""


class ConflictError(ImageSearchError):
    """Base of the 409 errors."""


class LibraryAlreadyExistsError(ConflictError):
    """409 ``LIBRARY_ALREADY_EXISTS``."""


class ModelMismatchError(ConflictError):
    """409 ``MODEL_MISMATCH``: the library was built with another model than the service now serves."""


class PayloadTooLargeError(ImageSearchError):
    """413 ``PAYLOAD_TOO_LARGE``."""


class OverloadedError(ImageSearchError):
    """503 ``OVERLOADED``: the service shed the request; retry with backoff (the client does, see
    ``retries``)."""


class UnavailableError(ImageSearchError):
    """503 ``UNAVAILABLE``: a deployment the request needs has no running replica (the message names
    it); retry later."""


class InternalError(ImageSearchError):
    """500 ``INTERNAL_ERROR``: the message carries an incident id that is in the service's logs."""


class InvalidResponseError(ImageSearchError):
    """The answer is not an envelope (e.g. a proxy's HTML error page); ``status`` is ``INVALID_RESPONSE``."""


ERRORS_BY_STATUS: dict[str, type[ImageSearchError]] = {
    "INVALID_PARAMETER": InvalidParameterError,
    "MODE_NOT_SUPPORTED": ModeNotSupportedError,
    "UNAUTHORIZED": UnauthorizedError,
    "LIBRARY_NOT_FOUND": LibraryNotFoundError,
    "IMAGE_NOT_FOUND": ImageNotFoundError,
    "TASK_NOT_FOUND": TaskNotFoundError,
    "NOT_FOUND": RouteNotFoundError,
    "METHOD_NOT_ALLOWED": MethodNotAllowedError,
    "LIBRARY_ALREADY_EXISTS": LibraryAlreadyExistsError,
    "MODEL_MISMATCH": ModelMismatchError,
    "PAYLOAD_TOO_LARGE": PayloadTooLargeError,
    "OVERLOADED": OverloadedError,
    "UNAVAILABLE": UnavailableError,
    "INTERNAL_ERROR": InternalError,
}


def error_from_envelope(http_status: int, env: Mapping[str, Any]) -> ImageSearchError:
    """The exception for an error envelope; an unknown status string gives the base class."""
    status = str(env.get("status"))
    cls = ERRORS_BY_STATUS.get(status, ImageSearchError)
    return cls(status, str(env.get("message") or status), http_status, env.get("data"))


# -- results ---------------------------------------------------------------------------------------


class _Model(BaseModel):
    # Fields a newer service adds are kept (readable as attributes), not rejected.
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class ModelInfo(_Model):
    name: str
    pretrained: str | None = None
    dim: int


class Library(_Model):
    library_name: str
    mode: str
    description: str | None = None
    image_count: int
    created_at: str
    model: ModelInfo
    index: dict[str, Any] | None = None
    embedding: str | None = None
    shards: int = 1


class DeploymentState(_Model):
    status: str
    running: int
    target: int


class Health(_Model):
    ready: bool
    model: str
    pretrained: bool
    device: str
    dim: int
    libraries: int
    warning: str | None = None
    #: Serve's view of each deployment (running replicas of target); ready only when each runs.
    deployments: dict[str, DeploymentState] = Field(default_factory=dict)


class AddResult(_Model):
    image_id: str
    image_uri: str
    created: bool


class _HasFrame(_Model):
    # Left out of repr(): a frame is often hundreds of kilobytes of base64.
    image_base64: str | None = Field(None, repr=False)

    def image_bytes(self) -> bytes | None:
        """The stored frame decoded, or ``None`` when the service returned none."""
        return None if self.image_base64 is None else base64.b64decode(self.image_base64)


class ImageRecord(_HasFrame):
    image_id: str
    image_uri: str
    tags: dict[str, Any]
    vector_kind: str | None = None
    created_at: str | None = None
    updated_at: str | None = None


class SearchResult(_HasFrame):
    image_id: str
    image_uri: str
    score: float
    tags: dict[str, Any]


class TaskError(_Model):
    line: int | None = None
    image_id: str | None = None
    image_uri: str | None = None
    reason: str


class ImportTask(_Model):
    task_id: str
    library_name: str
    state: str
    total: int | None = None
    succeeded: int = 0
    failed: int = 0
    errors: list[TaskError] = []
    created_at: str | None = None
    finished_at: str | None = None

    @property
    def done(self) -> bool:
        """Whether the task has finished (its counts will not change any more)."""
        return self.state in TERMINAL_TASK_STATES


# -- the client ------------------------------------------------------------------------------------


def encode_image(image: ImageInput) -> str:
    """Base64 of raw image bytes, or of the file at a path."""
    if isinstance(image, bytes):
        data = image
    elif isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            data = f.read()
    else:
        raise TypeError(f"image must be bytes or a file path, not {type(image).__name__}")
    return base64.b64encode(data).decode("ascii")


class _Backoff(Retry):
    """urllib3's ``Retry`` with a delay before the first retry as well (urllib3 retries that one at once)."""

    def get_backoff_time(self) -> float:
        if not self.history:
            return 0.0
        delay = self.backoff_factor * 2 ** (len(self.history) - 1) + random.random() * self.backoff_jitter
        return float(min(self.backoff_max, delay))


def _retry_policy(retries: int, backoff: float) -> Retry:
    """Connection failures and 503/429 answers, every method (all routes are idempotent), honouring
    ``Retry-After``; the last answer is returned rather than raised when the retries run out."""
    return _Backoff(
        total=retries,
        connect=retries,
        read=False,  # a read timeout raises as itself (requests.Timeout), never retried
        status=retries,
        other=0,
        redirect=0,
        allowed_methods=None,
        status_forcelist=RETRY_STATUSES,
        backoff_factor=backoff,
        backoff_jitter=backoff,
        respect_retry_after_header=True,
        raise_on_status=False,
    )


class ImageSearchClient:
    """Client of one image-search service.

    Args:
        url: the service's root, e.g. ``http://127.0.0.1:8000`` (include the Serve ``route_prefix`` when
            the app is not at ``/``); the API prefix ``/api/v1/operators/image-search`` is added here.
        api_key: sent as ``Authorization: Bearer <key>`` when given.
        timeout: seconds for each HTTP request (connect and read), or a ``(connect, read)`` pair.
        retries: how many times a request answered 503 or 429 (or whose connection failed) is retried,
            after the answer's ``Retry-After`` or else an exponential backoff with jitter; other errors
            (read timeouts included) are raised at once. Every route of the service is safe to retry:
            adds are upserts and deletes are idempotent.
        backoff: the first retry's delay in seconds (doubled each time, plus up to ``backoff`` of jitter).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        timeout: float | tuple[float, float] = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
    ) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"ImageSearchClient({self.url!r}, api_key={'***' if self.api_key else None})"

    # -- transport ---------------------------------------------------------------------------------

    @property
    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(max_retries=_retry_policy(self.retries, self.backoff))
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            if self.api_key:
                session.headers["Authorization"] = f"Bearer {self.api_key}"
            self._local.session = session
        return session

    def close(self) -> None:
        """Close this thread's connection pool (other threads' pools close when they are collected)."""
        session = getattr(self._local, "session", None)
        if session is not None:
            session.close()
            self._local.session = None

    def __enter__(self) -> ImageSearchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """Call a route (``path`` below the API prefix) and return the envelope's ``data``.

        Raises:
            ImageSearchError: (a subclass per status string) for an error envelope or a non-envelope
                answer.
            requests.RequestException: the service could not be reached (after the retries).
        """
        url = self.url + PREFIX + path
        response = self._session.request(method, url, json=body, timeout=self.timeout)
        return self._unwrap(response)

    @staticmethod
    def _unwrap(response: requests.Response) -> Any:
        try:
            env = response.json()
        except ValueError:
            env = None
        if not isinstance(env, dict) or "status" not in env:
            text = response.text.strip().replace("\n", " ")[:200]
            raise InvalidResponseError(
                "INVALID_RESPONSE",
                f"{response.request.method} {response.url} answered HTTP {response.status_code} without "
                f"the API's JSON envelope: {text or '(empty body)'}",
                response.status_code,
            )
        if env["status"] != "SUCCESS" or response.status_code >= 400:
            raise error_from_envelope(response.status_code, env)
        return env.get("data")

    def _get(self, path: str) -> Any:
        return self.request("GET", path)

    def _post(self, path: str, body: Mapping[str, Any]) -> Any:
        return self.request("POST", path, body)

    # -- operations --------------------------------------------------------------------------------

    def health(self) -> Health:
        """``GET /health``: whether the graph is ready, its model and device.

        Raises:
            UnavailableError: a deployment has no running replica (``error.data`` holds the states).
        """
        return Health.model_validate(self._get("/health"))

    # -- libraries ---------------------------------------------------------------------------------

    def create_library(
        self,
        library_name: str,
        mode: Mode = "general_search",
        description: str | None = None,
        *,
        index_kind: str | None = None,
        shards: int | None = None,
    ) -> Library:
        """``POST /library/create``. Raises :class:`LibraryAlreadyExistsError` when it exists.

        ``index_kind`` (auto, flat, hnsw, ivfpq) and ``shards`` (records split by image id over that
        many shards) are left to the service's defaults when None."""
        body: dict[str, Any] = {"library_name": library_name, "mode": mode}
        if description is not None:
            body["description"] = description
        if index_kind is not None:
            body["index_kind"] = index_kind
        if shards is not None:
            body["shards"] = shards
        return Library.model_validate(self._post("/library/create", body))

    def list_libraries(self) -> list[Library]:
        """``GET /library/list``, sorted by name."""
        return [Library.model_validate(lib) for lib in self._get("/library/list")["libraries"]]

    def get_library(self, library_name: str) -> Library:
        """``GET /library/{library_name}``. Raises :class:`LibraryNotFoundError`."""
        return Library.model_validate(self._get("/library/" + quote(library_name, safe="")))

    def delete_library(self, library_name: str) -> None:
        """``POST /library/delete``: removes every image, vector and stored frame of the library."""
        self._post("/library/delete", {"library_name": library_name})

    # -- images ------------------------------------------------------------------------------------

    def add_image(
        self,
        library_name: str,
        image_id: str,
        image_uri: str,
        image: ImageInput | None = None,
        *,
        image_base64: str | None = None,
        tags: Mapping[str, TagValue] | None = None,
        save_image: bool = True,
    ) -> AddResult:
        """``POST /image/add``: insert or overwrite the record (``image_id``, ``image_uri``).

        Args:
            image: the image's bytes or file path; with neither ``image`` nor ``image_base64`` the
                service fetches ``image_uri`` itself.
            image_base64: the image already base64-encoded (instead of ``image``).
            tags: a flat object of strings, numbers, booleans or lists of those.
            save_image: keep the bytes so that searches can return them.
        """
        if image is not None and image_base64 is not None:
            raise ValueError("give image or image_base64, not both")
        body: dict[str, Any] = {
            "library_name": library_name,
            "image_id": image_id,
            "image_uri": image_uri,
            "tags": dict(tags or {}),
            "save_image": save_image,
        }
        if image is not None:
            body["image_base64"] = encode_image(image)
        elif image_base64 is not None:
            body["image_base64"] = image_base64
        return AddResult.model_validate(self._post("/image/add", body))

    def get_images(
        self, library_name: str, image_id: str, image_uri: str | None = None, *, return_frame: bool = False
    ) -> list[ImageRecord]:
        """``POST /image/get``: an id's records (every uri, or one). Raises :class:`ImageNotFoundError`."""
        body = _drop_none(
            {
                "library_name": library_name,
                "image_id": image_id,
                "image_uri": image_uri,
                "return_frame": return_frame,
            }
        )
        return [ImageRecord.model_validate(r) for r in self._post("/image/get", body)["images"]]

    def update_tags(
        self,
        library_name: str,
        image_id: str,
        tags: Mapping[str, TagValue],
        image_uri: str | None = None,
    ) -> int:
        """``POST /image/update_tags``: replace the whole tag object; returns how many records changed."""
        body = _drop_none(
            {"library_name": library_name, "image_id": image_id, "image_uri": image_uri, "tags": dict(tags)}
        )
        return int(self._post("/image/update_tags", body)["updated"])

    def delete_image(self, library_name: str, image_id: str, image_uri: str | None = None) -> int:
        """``POST /image/delete``: every uri of the id, or one; returns how many were deleted (0 is fine)."""
        body = _drop_none({"library_name": library_name, "image_id": image_id, "image_uri": image_uri})
        return int(self._post("/image/delete", body)["deleted"])

    # -- bulk import tasks -------------------------------------------------------------------------

    def create_import_task(self, library_name: str, source: str, *, save_image: bool | None = None) -> str:
        """``POST /image/tasks/create``: start a background import of a JSONL file; returns the task id.

        ``source`` is read by the service: a path under one of its allowed roots, an ``http(s)://`` or an
        object-store URI. Raises :class:`RouteNotFoundError` when the service has no import tasks.
        """
        body = _drop_none({"library_name": library_name, "source": source, "save_image": save_image})
        return str(self._post("/image/tasks/create", body)["task_id"])

    def get_import_task(self, task_id: str) -> ImportTask:
        """``GET /image/tasks/results/{task_id}``. Raises :class:`TaskNotFoundError`."""
        return ImportTask.model_validate(self._get("/image/tasks/results/" + quote(task_id, safe="")))

    def cancel_import_task(self, task_id: str) -> ImportTask:
        """``POST /image/tasks/cancel``: stop a pending or running task (it ends ``CANCELLED`` with what
        it committed); a finished task is answered unchanged. Raises :class:`TaskNotFoundError`."""
        return ImportTask.model_validate(self._post("/image/tasks/cancel", {"task_id": task_id}))

    def wait_for_import_task(
        self,
        task_id: str,
        *,
        poll_interval: float = 1.0,
        timeout: float | None = None,
        on_progress: Callable[[ImportTask], None] | None = None,
    ) -> ImportTask:
        """Poll an import task until it finishes and return its final state.

        Args:
            on_progress: called with each polled state (e.g. to move a progress bar).
            timeout: seconds to wait at most; ``TimeoutError`` after that (the task goes on).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            task = self.get_import_task(task_id)
            if on_progress is not None:
                on_progress(task)
            if task.done:
                return task
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"import task {task_id} still {task.state} after {timeout}s")
            time.sleep(poll_interval)

    # -- search ------------------------------------------------------------------------------------

    def search_by_image(
        self,
        library_name: str,
        image: ImageInput | None = None,
        *,
        image_base64: str | None = None,
        top_k: int = 10,
        tag_filter: Any = None,
        return_frame: bool = True,
        min_score: float | None = None,
    ) -> list[SearchResult]:
        """``POST /search/by-image``: the ``top_k`` most similar images, best first.

        Args:
            image: the query image's bytes or file path (or give ``image_base64``).
            tag_filter: a condition, a list (AND) or ``{"or": [...]}``; applied before ranking.
            return_frame: include each hit's stored image (``SearchResult.image_bytes()``).
            min_score: drop hits scoring below it.
        """
        if (image is None) == (image_base64 is None):
            raise ValueError("give exactly one of image or image_base64")
        query = image_base64 if image_base64 is not None else encode_image(image)  # type: ignore[arg-type]
        return self._search(
            "/search/by-image",
            {"library_name": library_name, "image_base64": query},
            top_k,
            tag_filter,
            return_frame,
            min_score,
        )

    def search_by_text(
        self,
        library_name: str,
        query_text: str,
        *,
        top_k: int = 10,
        tag_filter: Any = None,
        return_frame: bool = True,
        min_score: float | None = None,
    ) -> list[SearchResult]:
        """``POST /search/by-text`` (``general_search`` libraries; else :class:`ModeNotSupportedError`)."""
        return self._search(
            "/search/by-text",
            {"library_name": library_name, "query_text": query_text},
            top_k,
            tag_filter,
            return_frame,
            min_score,
        )

    def search_by_id(
        self,
        library_name: str,
        image_id: str,
        image_uri: str | None = None,
        *,
        top_k: int = 10,
        tag_filter: Any = None,
        return_frame: bool = True,
        min_score: float | None = None,
    ) -> list[SearchResult]:
        """``POST /search/by-id``: search with a stored record's vector (no upload)."""
        return self._search(
            "/search/by-id",
            _drop_none({"library_name": library_name, "image_id": image_id, "image_uri": image_uri}),
            top_k,
            tag_filter,
            return_frame,
            min_score,
        )

    def _search(
        self,
        path: str,
        body: dict[str, Any],
        top_k: int,
        tag_filter: Any,
        return_frame: bool,
        min_score: float | None,
    ) -> list[SearchResult]:
        body = {**body, "top_k": top_k, "return_frame": return_frame}
        if tag_filter is not None:
            body["tag_filter"] = tag_filter
        if min_score is not None:
            body["min_score"] = min_score
        return [SearchResult.model_validate(r) for r in self._post(path, body)["results"]]


def _drop_none(body: dict[str, Any]) -> dict[str, Any]:
    """Leave optional fields out rather than sending ``null`` (the service treats both alike)."""
    return {k: v for k, v in body.items() if v is not None}
