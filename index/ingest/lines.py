"""JSONL import lines: :class:`LineReader` reads physical lines with a length cap, :func:`parse_line`
turns one into a :class:`ParsedLine` (base64 decoded) or a :class:`LineError` that says what is wrong.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from filters import TagError, TagLimits, validate_tags
from index.model.imaging import decode_base64
from index.storage.tasks import LineError


class ImportLine(BaseModel):
    """One JSONL line. Closed like the API's request bodies: an unknown key (``tag``) is an error."""

    model_config = ConfigDict(extra="forbid", strict=True)

    image_id: str = Field(min_length=1, max_length=256)
    image_uri: str = Field(min_length=1, max_length=2048)
    image_base64: str | None = Field(None, min_length=1)
    tags: Any = Field(default_factory=dict)


@dataclass
class ParsedLine:
    line: int
    image_id: str
    image_uri: str
    tags: dict[str, Any]
    data: bytes | None  # decoded image_base64; None: fetch image_uri


def parse_line(
    raw: bytes, line: int, *, tag_limits: TagLimits, max_image_bytes: int
) -> ParsedLine | LineError:
    """Parse and validate one JSONL line (base64 decoded here too); a LineError says what is wrong."""
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return LineError(line, f"not valid JSON: {exc}")
    except RecursionError:  # json's C parser gives up on about 1000 nested levels
        return LineError(line, "not valid JSON: nested too deeply")
    if not isinstance(obj, dict):
        return LineError(line, f"expected a JSON object, got {type(obj).__name__}")
    ids = {k: obj[k] if isinstance(obj.get(k), str) else None for k in ("image_id", "image_uri")}
    try:
        parsed = ImportLine.model_validate(obj)
    except ValidationError as exc:
        return LineError(line, validation_reason(exc), **ids)
    try:
        tags = validate_tags(parsed.tags, limits=tag_limits)
    except TagError as exc:
        return LineError(line, str(exc), **ids)
    data = None
    if parsed.image_base64 is not None:
        try:
            data = decode_base64(parsed.image_base64, max_bytes=max_image_bytes)
        except ValueError as exc:  # ImageTooLarge included
            return LineError(line, f"image_base64: {exc}", **ids)
    return ParsedLine(line, parsed.image_id, parsed.image_uri, tags, data)


def validation_reason(exc: ValidationError) -> str:
    """``image_id: Field required; tag: unknown field`` (the first three problems)."""
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err.get("loc", ())) or "line"
        parts.append(
            f"{where}: {'unknown field' if err.get('type') == 'extra_forbidden' else err.get('msg')}"
        )
    more = exc.error_count() - 3
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


class TooManyBlankLines(ValueError):
    """The source holds more blank lines than allowed (a gzip of newlines must not keep a reader busy)."""


class ByteBudget:
    """Bytes held by import lines in flight, under ``capacity``; thread-safe (the reader takes from its
    thread, commits give back on the event loop).

    A child budget (a task's, ``parent`` the runner's) takes from both at once: it succeeds only when
    both have room, so the sum over tasks stays under the runner's capacity. :meth:`close` gives a
    child's bytes back to its parent at once (a task that ended, whatever its threads still do).
    """

    def __init__(self, capacity: int, *, parent: ByteBudget | None = None) -> None:
        self.capacity = capacity
        self.parent = parent
        self.used = 0
        self.closed = False
        self._lock: threading.Lock = parent._lock if parent is not None else threading.Lock()

    def _chain(self) -> list[ByteBudget]:
        return [self] if self.parent is None else [self, *self.parent._chain()]

    def try_take(self, n: int) -> bool:
        """Take ``n`` bytes if every budget of the chain has room for them (never once closed)."""
        with self._lock:
            chain = self._chain()
            if self.closed or any(b.used + n > b.capacity for b in chain):
                return False
            for b in chain:
                b.used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            if not self.closed:
                for b in self._chain():
                    b.used -= n

    def close(self) -> None:
        """Give everything this budget holds back to its parents; later calls change nothing."""
        with self._lock:
            if not self.closed:
                for b in self._chain()[1:]:
                    b.used -= self.used
                self.closed = True

    def has_room(self, n: int) -> bool:
        with self._lock:
            return all(b.used + n <= b.capacity for b in self._chain())


class LineReader:
    """Physical lines of a binary stream, with a length cap that never buffers an over-long line.

    Blank lines are skipped but counted in line numbers (which are what an editor shows, 1-based), and
    at most ``max_blank_lines`` of them are read (beyond: :class:`TooManyBlankLines`). With a
    ``budget``, a line is read only once ``max_line_bytes + extra_bytes`` can be taken from it (the
    unused part of ``max_line_bytes`` is given back once the line's length is known): each line handed
    out keeps its length plus ``extra_bytes`` (room for an image it may name: the caller gives back what
    the line turns out not to need) taken until the caller gives them back, and :meth:`read_chunk`
    (:meth:`iter_chunk`) ends early, setting ``starved``, when there is no room. An over-long line keeps
    nothing.

    Attributes:
        line_no: physical lines consumed so far.
        records: non-blank lines consumed so far (skipped ones included).
        blank: blank lines consumed so far.
        eof: the end of the stream was reached.
        starved: the last :meth:`read_chunk` stopped for lack of budget.
    """

    def __init__(
        self,
        stream: IO[bytes],
        *,
        max_line_bytes: int,
        max_blank_lines: int | None = None,
        budget: ByteBudget | None = None,
        extra_bytes: int = 0,
    ) -> None:
        self.stream = stream
        self.max_line_bytes = max_line_bytes
        self.extra_bytes = extra_bytes
        self.max_blank_lines = max_blank_lines
        self.budget = budget
        self.line_no = 0
        self.records = 0
        self.blank = 0
        self.eof = False
        self.starved = False

    @property
    def reservation(self) -> int:
        """Bytes taken from the budget while one line is read."""
        return self.max_line_bytes + 2 + self.extra_bytes

    def _count_blank(self) -> None:
        self.blank += 1
        if self.max_blank_lines is not None and self.blank > self.max_blank_lines:
            raise TooManyBlankLines(
                f"the source holds more than {self.max_blank_lines} blank lines (imports.max_blank_lines)"
            )

    def _next(self) -> tuple[int, bytes | None] | None:
        """The next non-blank line as (line number, bytes, or None when too long); None at the end or
        (setting ``starved``) when the budget has no room for a line."""
        if self.budget is not None and not self.budget.try_take(self.reservation):
            self.starved = True
            return None
        kept = 0
        try:
            item = self._read_one()
            while item is not None and item[0] == -1:  # blank lines hold nothing
                item = self._read_one()
            kept = len(item[1]) + self.extra_bytes if item is not None and item[1] is not None else 0
            return item
        finally:
            if self.budget is not None:
                self.budget.give(self.reservation - kept)

    def _read_one(self) -> tuple[int, bytes | None] | None:
        """One physical line: (number, content or None when too long), (-1, None) for a blank line,
        None at the end."""
        raw = self.stream.readline(self.max_line_bytes + 2)  # content + "\r\n"
        if not raw:
            self.eof = True
            return None
        self.line_no += 1
        if len(raw) == self.max_line_bytes + 2 and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # drain the rest of the line in bounded reads
                raw = self.stream.readline(1024 * 1024)
            self.records += 1
            return self.line_no, None
        content = raw.rstrip(b"\r\n")
        if not content.strip():
            self._count_blank()
            return -1, None
        self.records += 1
        if len(content) > self.max_line_bytes:
            return self.line_no, None
        return self.line_no, content

    def read_chunk(self, n: int) -> list[tuple[int, bytes | None]]:
        """Up to ``n`` non-blank lines (fewer at the end of the stream, or when starved)."""
        return list(self.iter_chunk(n))

    def iter_chunk(self, n: int) -> Iterator[tuple[int, bytes | None]]:
        """:meth:`read_chunk`, one line at a time: each line is read when the caller asks for it."""
        self.starved = False
        for _ in range(n):
            item = self._next()
            if item is None:
                return
            yield item

    def skip(self, lines: int) -> None:
        """Consume physical lines up to and including line number ``lines`` (resume)."""
        while self.line_no < lines:
            raw = self.stream.readline(1024 * 1024)
            if not raw:
                self.eof = True
                return
            blank = not raw.strip()
            while not raw.endswith(b"\n"):  # an over-long line: read on to its end
                raw = self.stream.readline(1024 * 1024)
                if not raw:
                    break
                blank = blank and not raw.strip()
            self.line_no += 1
            if blank:
                self._count_blank()
            else:
                self.records += 1

    def count_rest(self) -> int:
        """Consume the stream; return the number of records it held in all."""
        while self._read_one() is not None:
            pass
        return self.records
