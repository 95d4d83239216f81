"""Request models of the REST contract (``../shared/spec/API.md``).

Strict and closed: unknown fields are rejected (a typo such as ``tag_filters`` must not silently return
unfiltered results), and no type is coerced (``"5"`` is not a ``top_k``). ``tags`` and ``tag_filter``
are typed ``Any`` here and validated by ``filters`` so that their errors name the exact path.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from index.search.sharding import MAX_SHARDS
from index.storage.embedded.catalog import MAX_DESCRIPTION_LENGTH


def LibraryName() -> Any:
    return Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def ImageId() -> Any:
    return Field(min_length=1, max_length=256)


def ImageUri(default: Any = ...) -> Any:
    return Field(default, min_length=1, max_length=2048)


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CreateLibrary(Request):
    library_name: str = LibraryName()
    mode: Literal["general_search", "item_search", "adaptive_search"]
    description: str | None = Field(None, max_length=MAX_DESCRIPTION_LENGTH)
    index_kind: Literal["auto", "flat", "hnsw", "ivfpq"] = Field(
        "auto", description="ours: the library's index kind; auto picks it by size (docs/API.md)"
    )
    shards: int = Field(
        1,
        ge=1,
        le=MAX_SHARDS,
        description="ours: shards holding the library's records, fixed at creation (docs/API.md); "
        "at most limits.max_shards",
    )


class DeleteLibrary(Request):
    library_name: str = LibraryName()


class AddImage(Request):
    library_name: str = LibraryName()
    image_id: str = ImageId()
    image_uri: str = ImageUri()
    image_base64: str | None = Field(None, min_length=1, description="absent: the service fetches image_uri")
    tags: Any = Field(default_factory=dict, description="flat object of string/number/boolean/list values")
    save_image: bool = True


class CreateTask(Request):
    library_name: str = LibraryName()
    source: str = Field(
        min_length=1,
        max_length=4096,
        description="the JSONL file: a path under import_roots, an http(s):// URI or an object-store URI",
    )
    save_image: bool = True


class CancelTask(Request):
    task_id: str = Field(min_length=1, max_length=256, description="the task to cancel")


class GetImage(Request):
    library_name: str = LibraryName()
    image_id: str = ImageId()
    image_uri: str | None = ImageUri(None)
    return_frame: bool = False


class UpdateTags(Request):
    library_name: str = LibraryName()
    image_id: str = ImageId()
    image_uri: str | None = ImageUri(None)
    tags: Any


class DeleteImage(Request):
    library_name: str = LibraryName()
    image_id: str = ImageId()
    image_uri: str | None = ImageUri(None)


class SearchCommon(Request):
    library_name: str = LibraryName()
    top_k: int = Field(10, ge=1, le=1000)
    tag_filter: Any = None
    return_frame: bool = True
    min_score: float | None = Field(None, ge=0.0, le=1.0)
    recall_target: float | None = Field(
        None,
        ge=0.5,
        le=1.0,
        description="ours: recall@10 to aim for (default: the deployment's; docs/API.md)",
    )


class SearchByImage(SearchCommon):
    image_base64: str = Field(min_length=1)


class SearchByText(SearchCommon):
    query_text: str = Field(min_length=1, max_length=1000)


class SearchById(SearchCommon):
    image_id: str = ImageId()
    image_uri: str | None = ImageUri(None)
