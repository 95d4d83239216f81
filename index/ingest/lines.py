"""JSONL import lines: :class:`LineReader` reads physical lines with a length cap, :func:`parse_line`
turns one into a :class:`ParsedLine` (base64 decoded) or a :class:`LineError` that says what is wrong.
"""

from __future__ import annotations

import json
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


class LineReader:
    """Physical lines of a binary stream, with a length cap that never buffers an over-long line.

    Blank lines are skipped but counted in line numbers (which are what an editor shows, 1-based).

    Attributes:
        line_no: physical lines consumed so far.
        records: non-blank lines consumed so far (skipped ones included).
        eof: the end of the stream was reached.
    """

    def __init__(self, stream: IO[bytes], *, max_line_bytes: int) -> None:
        self.stream = stream
        self.max_line_bytes = max_line_bytes
        self.line_no = 0
        self.records = 0
        self.eof = False

    def _next(self) -> tuple[int, bytes | None] | None:
        """The next non-blank line as (line number, bytes, or None when too long); None at the end."""
        while True:
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
                continue
            self.records += 1
            if len(content) > self.max_line_bytes:
                return self.line_no, None
            return self.line_no, content

    def read_chunk(self, n: int) -> list[tuple[int, bytes | None]]:
        """Up to ``n`` non-blank lines (fewer only at the end of the stream)."""
        out = []
        while len(out) < n:
            item = self._next()
            if item is None:
                break
            out.append(item)
        return out

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
            if not blank:
                self.records += 1

    def count_rest(self) -> int:
        """Consume the stream; return the number of records it held in all."""
        while self._next() is not None:
            pass
        return self.records
