"""The builder's arguments: everything configurable, validated once, passed down explicitly.

``serve run deployments.app:build_app model=tiny-random storage_root=/tmp/x`` and the ``args:`` of
``serve_config.yaml`` both land here. Deployment-level knobs (replicas, autoscaling, resources, batch
sizes in ``user_config``) live in ``serve_config.yaml``'s ``deployments:`` section instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, IPvAnyNetwork, field_validator, model_validator

from deployments.schemas import LibraryName
from filters import FilterLimits, TagLimits
from filters.tree import COST_UNITS, DEFAULT_MAX_COST, MAX_COST_BOUND
from filters.work import DEFAULT_MAX_WORK, MAX_WORK_BOUND, WORK_UNITS
from index.detect.faces import FaceConfig
from index.detect.modes import DetectionConfig, ItemDetectorConfig
from index.ingest.fetch import FetchPolicy
from index.ingest.importer import ImportSettings, budget_too_small
from index.model.imaging import ImageLimits
from index.search.ann import IndexConfig
from index.search.scores import ScoreCalibration
from index.search.sharding import MAX_SHARDS
from index.storage.backends import StorageSettings

#: The pretrained tag used when ``pretrained`` is not given, for the models we document.
DEFAULT_PRETRAINED = {
    "ViT-B-32": "laion2b_s34b_b79k",
    "ViT-B-16": "laion2b_s34b_b88k",
    "ViT-L-14": "laion2b_s32b_b82k",
    "xlm-roberta-base-ViT-B-32": "laion5b_s13b_b90k",
}

MiB = 1024 * 1024
_IMAGE = ImageLimits.model_fields
# Any: FieldInfos used as defaults (pydantic copies the field, its bounds and description).
_FETCH: dict[str, Any] = FetchPolicy.model_fields
_STORAGE: dict[str, Any] = StorageSettings.model_fields
_SCORES: dict[str, Any] = ScoreCalibration.model_fields


class Limits(BaseModel):
    """Input limits; every one is answered with the envelope (400, 413 or 503) when exceeded."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(32 * MiB, gt=0, description="HTTP body size (413 above it)")
    max_image_bytes: int = Field(_IMAGE["max_bytes"].default, gt=0, description="decoded image bytes (413)")
    max_image_pixels: int = Field(
        _IMAGE["max_pixels"].default, gt=0, description="width x height (413; decompression bombs)"
    )
    image_formats: list[str] = Field(
        default_factory=lambda: list(_IMAGE["formats"].default),
        min_length=1,
        description="accepted image formats (Pillow names, e.g. JPEG, PNG, WEBP, GIF, BMP, TIFF); others 400",
    )
    # The contract caps query_text and top_k at 1000 (the request schema says so): these may only lower it.
    max_text_chars: int = Field(1000, gt=0, le=1000, description="query_text length")
    max_top_k: int = Field(1000, gt=0, le=1000, description="top_k upper bound")
    max_libraries: int = Field(1000, gt=0, description="libraries per deployment")
    max_shards: int = Field(
        16,
        ge=1,
        le=MAX_SHARDS,
        description="shards of one library (each shard is a multiplexed model of a LibraryIndex replica)",
    )
    max_filter_depth: int = Field(32, gt=0, description="tag_filter nesting levels")
    max_filter_conditions: int = Field(1000, gt=0, description="conditions in one tag_filter")
    max_filter_in_values: int = Field(1000, gt=0, description="values in one in / not in list")
    max_filter_cost: int = Field(
        DEFAULT_MAX_COST,
        ge=1,
        le=MAX_COST_BOUND,
        description=f"evaluation budget of one tag_filter, checked before it runs (400 above it), in cost "
        f"units: {COST_UNITS}",
    )
    max_filter_work: int = Field(
        DEFAULT_MAX_WORK,
        ge=1,
        le=MAX_WORK_BOUND,
        description="evaluation budget of one tag_filter over the tags of the library (each shard) it "
        "runs on, checked by the LibraryIndex before it runs (400 above it): unlike max_filter_cost it "
        "counts the data (rows, entries, distinct strings and their length); the default keeps the "
        f"worst allowed filter near 100 ms at 1M rows; in work units: {WORK_UNITS}",
    )
    max_tags: int = Field(64, gt=0, description="keys per tag object")
    max_tag_key_length: int = Field(128, gt=0, description="characters in a tag name")
    max_tag_list_length: int = Field(256, gt=0, description="elements in a list-valued tag")
    max_tag_string_length: int = Field(1024, gt=0, description="characters in a tag (or filter) string")
    unavailable_wait_s: float = Field(
        10.0,
        ge=0,
        le=300,
        description="how long a call waits for a deployment with no running replica (one restarting on "
        "another node, a rolling update) before 503 UNAVAILABLE",
    )
    max_concurrent_requests: int = Field(
        64,
        gt=0,
        description="requests one ingress replica works on at once; beyond it 503 OVERLOADED (keep it below "
        "the Ingress deployment's max_ongoing_requests so that this limit, not Serve's queue, answers)",
    )
    fetch_timeout_s: float = Field(
        _FETCH["timeout_s"].default, gt=0, description="fetching image_uri when no image_base64 is sent"
    )

    @field_validator("image_formats")
    @classmethod
    def _known_formats(cls, formats: list[str]) -> list[str]:
        upper = [f.upper() for f in formats]
        ImageLimits(formats=tuple(upper))  # raises ValueError naming formats Pillow cannot read
        return upper

    def storage_settings(self) -> StorageSettings:
        """Where the data lives (``index.storage.backends.open_storage`` opens it in each replica)."""
        return StorageSettings(**{name: getattr(self, name) for name in StorageSettings.model_fields})

    def image_limits(self) -> ImageLimits:
        return ImageLimits(
            max_pixels=self.max_image_pixels,
            max_bytes=self.max_image_bytes,
            formats=tuple(self.image_formats),
        )

    def filter_limits(self) -> FilterLimits:
        return FilterLimits(
            max_depth=self.max_filter_depth,
            max_conditions=self.max_filter_conditions,
            max_in_values=self.max_filter_in_values,
            max_string_length=self.max_tag_string_length,
            max_cost=self.max_filter_cost,
        )

    def tag_limits(self) -> TagLimits:
        return TagLimits(
            max_keys=self.max_tags,
            max_key_length=self.max_tag_key_length,
            max_list_length=self.max_tag_list_length,
            max_string_length=self.max_tag_string_length,
        )


class EncodeBatching(BaseModel):
    """How each Ingress replica gathers the items of concurrent requests into one call to the Encoder.

    One call per item would cost a Serve call (routing, serialisation, the replica's request handling)
    per image on both sides; on a GPU, where an image costs less than that, the calls would bound the
    encoder. The Encoder still merges the batches of all ingress replicas into its forward passes.
    """

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(32, ge=1, le=1024, description="most items in one call to the Encoder")
    batch_wait_timeout_s: float = Field(
        0.002, ge=0.0, le=1.0, description="how long a call waits for more items (the latency it adds)"
    )


class DedicatedShards(BaseModel):
    """Shards of one library served by LibraryIndex deployments of their own ("big shards").

    Each listed shard gets a deployment named ``LibraryIndex-<library>-<shard>`` with these ``.options()``
    (replicas, ``max_replicas_per_node``, ``ray_actor_options`` with ``num_cpus`` and ``memory``), whose
    replicas load their shard in their constructor: Serve routes no request to a replica before its
    constructor has returned, so a replica that is added, replaced after a node loss or rolled out by an
    update answers from a loaded index from its first request on. Every other library and shard is
    served by the shared, multiplexed ``LibraryIndex``. docs/operations.md, "Dedicated replicas for big
    shards".
    """

    model_config = ConfigDict(extra="forbid")

    library: Annotated[str, Field(description="the library whose shards these are")] = LibraryName()
    shards: list[int] = Field(
        min_length=1,
        description="which shards (0-based, each below limits.max_shards and listed once across all entries; "
        "shard 0 of a 1-shard library is the whole library)",
    )
    deployment: dict[str, Any] = Field(
        default_factory=dict,
        description="Serve .options() of each listed shard's deployment, e.g. {num_replicas: 2, "
        "max_replicas_per_node: 1, ray_actor_options: {num_cpus: 2, memory: 34359738368}}",
    )

    @field_validator("shards")
    @classmethod
    def _in_range(cls, shards: list[int]) -> list[int]:
        # (a shard listed twice, here or in another entry: AppArgs._dedicated_once)
        for k in shards:
            if not 0 <= k < MAX_SHARDS:
                raise ValueError(f"shard {k} is out of range: shards are numbered 0 to {MAX_SHARDS - 1}")
        return shards

    @field_validator("deployment")
    @classmethod
    def _no_name(cls, options: dict[str, Any]) -> dict[str, Any]:
        if "name" in options:
            raise ValueError("name: a dedicated shard's deployment is named LibraryIndex-<library>-<shard>")
        return options

    def deployment_names(self) -> dict[int, str]:
        """Each listed shard's deployment name."""
        return {k: f"LibraryIndex-{self.library}-{k}" for k in self.shards}


#: ``object_store_allowed``'s entries for one protocol (``index.ingest.fetch.FetchPolicy`` checks their form).
ObjectPrefixes = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=1024)]], Field(min_length=1, max_length=256)
]


class AppArgs(BaseModel):
    """Arguments of ``build_app``: the ``args:`` of a Serve config, or ``key=value`` after ``serve run
    deployments.app:build_app``. docs/configuration.md is generated from this model
    (``python -m deployments.config_reference``)."""

    # hide_input_in_errors: a validation error must not print database_url (it may hold a password).
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), hide_input_in_errors=True)

    model: str = Field(
        "ViT-B-32",
        description="open_clip model name, 'tiny-random' (the offline demo's random-weight model), or "
        "'local-dir:/path' (a folder holding open_clip_config.json + open_clip_model.safetensors)",
    )
    pretrained: str | None = Field(
        None,
        description="open_clip pretrained tag or a checkpoint file path; default: the model's usual LAION "
        "tag (DEFAULT_PRETRAINED, below); 'random' for explicit random weights (benchmarks). Weights that "
        "cannot be obtained fail the Encoder's start; it never falls back to random weights",
    )
    model_cache_dir: str | None = Field(
        None,
        description="where downloaded weights (and Hugging Face tokenizers) are cached; None: open_clip's "
        "default",
    )
    face_model: str | None = Field(
        None,
        description="adaptive_search: an open_clip model (name or 'local-dir:/path') trained for faces that "
        "embeds face crops instead of the main model, loaded exactly like model / pretrained; its vectors "
        "must have the main model's dimension. None (default): the main CLIP model embeds faces. No face "
        "model ships with the service (docs/operations.md, 'Detection')",
    )
    face_pretrained: str | None = Field(
        None, description="the face model's pretrained tag or checkpoint file (same rules as pretrained)"
    )
    device: str = Field(
        "auto",
        description="'auto' (CUDA when Ray assigned the Encoder replica a GPU, else the CPU), 'cpu', 'cuda', "
        "'cuda:N'",
    )
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="the Encoder's float precision; 'auto': fp16 on CUDA, fp32 on the CPU"
    )
    seed: int = Field(0, description="seed of random-weight models (identical across replicas)")
    # Storage (index.storage): embedded under storage_root, or cluster mode (PostgreSQL + object store).
    storage_root: str = _STORAGE["storage_root"]
    database_url: str | None = _STORAGE["database_url"]
    database_password_file: str | None = _STORAGE["database_password_file"]
    database_password_env: str | None = _STORAGE["database_password_env"]
    database_pool_size: int = _STORAGE["database_pool_size"]
    database_connect_timeout_s: float = _STORAGE["database_connect_timeout_s"]
    object_store_url: str | None = _STORAGE["object_store_url"]
    object_store_options: dict[str, Any] = _STORAGE["object_store_options"]
    cache_dir: str | None = _STORAGE["cache_dir"]
    snapshot_grace_s: float = _STORAGE["snapshot_grace_s"]
    limits: Limits = Field(
        default_factory=Limits,
        description="input limits: body and image size, pixels, image formats, text length, top_k, filter "
        "depth/size and cost budget, tag counts and sizes, libraries, shards, concurrent requests per "
        "ingress replica, fetch timeout (docs/API.md, 'Limits')",
    )
    jpeg_draft_decode: bool = Field(
        True,
        description="decode big JPEGs at 1/2, 1/4 or 1/8 scale straight from the DCT (Pillow's draft), "
        "keeping both sides at least the model's input size: less decoding work, but the pixels differ from "
        "a full decode + resize, so vectors move by up to 0.002 cosine (measured on large JPEGs) against "
        "open_clip's own preprocessing. false: the service's vectors equal open_clip's reference pipeline "
        "(Image.open(...).convert('RGB') + the model's eval transform) to float tolerance; set it when "
        "vectors must match ones computed elsewhere",
    )
    index: IndexConfig = Field(
        default_factory=IndexConfig,
        description="index kinds, thresholds, search effort and snapshot policy; a library may override the "
        "kind with index_kind on /library/create (docs/API.md)",
    )
    text_score_center: float = _SCORES["text_center"]
    text_score_scale: float = _SCORES["text_scale"]
    allowed_file_roots: list[str] = Field(
        default_factory=list, description="directories that file:// image URIs may read from"
    )
    fetch_allow_private: bool = Field(
        False,
        description="switch the address check of image_uri fetches off entirely: private, loopback, "
        "link-local and other non-public addresses become reachable (SSRF protection off: only for "
        "trusted clients and internal deployments)",
    )
    fetch_allowed_networks: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="CIDR networks image_uri fetches may reach although they are not public, e.g. an "
        "internal image store's 10.1.2.0/24; all other private, loopback, link-local... addresses are "
        "refused (SSRF; docs/API.md, 'Fetching image_uri')",
    )
    fetch_max_redirects: int = _FETCH["max_redirects"]
    import_roots: list[str] = Field(
        default_factory=list,
        description="directories local import sources (JSONL files) may be read from; in cluster mode leave "
        "it empty and import from object-store URLs (s3://..., allowed in object_store_allowed): nodes share "
        "no files",
    )
    object_store_allowed: dict[str, ObjectPrefixes] = Field(
        default_factory=dict,
        max_length=16,
        description="the objects clients may name in image_uri, import sources and the image URIs in them: "
        "fsspec protocol -> 'bucket' or 'bucket/prefix' entries (whole path components), e.g. "
        '{"s3": ["photos-bucket/public"]}; the service reads them with its own credentials, so list only '
        "what every client may read. Empty (default): no object-store URI from clients at all (the "
        "service's own object_store_url is not affected). The protocol's package (s3fs, gcsfs, adlfs) "
        "must be installed",
    )
    imports: ImportSettings = Field(
        default_factory=ImportSettings,
        description="bulk import limits and tuning (docs/API.md, 'Bulk import')",
    )
    encode_batching: EncodeBatching = Field(
        default_factory=EncodeBatching, description="the Ingress's calls to the Encoder (batches of items)"
    )
    api_keys: list[str] = Field(
        default_factory=list,
        description="accepted API keys; when there are any (here or in api_keys_file), every route but "
        "/health, /docs, /openapi.json and the web page (/, /static/*) needs Authorization: Bearer <key>. "
        "Keys have at least 8 printable characters, no spaces. Empty: no auth",
    )
    api_keys_file: str | None = Field(
        None,
        description="a file with one API key per line (# comments), read when a replica starts; a keys "
        "file without keys fails the deployment",
    )
    item_detector: ItemDetectorConfig = Field(
        default_factory=ItemDetectorConfig,
        description="how item_search finds the main item: 'saliency' (classical foreground against the "
        "border's colours, no weights) or 'clip-regions' (the served CLIP model scores candidate regions "
        "against item_prompts / background_prompts; needs real weights to mean anything, costs up to "
        "max_proposals encodings per image)",
    )
    face_detector: FaceConfig = Field(
        default_factory=FaceConfig,
        description="how adaptive_search finds faces: an OpenCV Haar cascade shipped in "
        "index/detect/cascades/ (a file name there, or a path), eye-based alignment, smallest face, crop "
        "margin; work_size / scale_factor trade face recall for speed",
    )
    dedicated_shards: list[DedicatedShards] = Field(
        default_factory=list,
        description="shards served by LibraryIndex deployments of their own, loaded before they are routed "
        "to (big shards; docs/operations.md, 'Dedicated replicas for big shards')",
    )
    deployment_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per-deployment .options() overrides keyed by deployment name (tests, quick runs); "
        "serve_config.yaml's deployments section is the usual place for these",
    )

    def load_api_keys(self) -> frozenset[str]:
        """Keys from ``api_keys`` and ``api_keys_file`` (read when a replica starts).

        Raises:
            ValueError: ``api_keys_file`` holds no key (a deployment that asked for auth must not start
                open), or a key is unusable.
            OSError: ``api_keys_file`` cannot be read.
        """
        keys = set(self.api_keys)
        if self.api_keys_file:
            with open(self.api_keys_file) as f:
                from_file = {ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")}
            if not from_file:
                raise ValueError(f"api_keys_file {self.api_keys_file!r} holds no API key")
            for key in from_file:
                _check_api_key(key, f"a key in {self.api_keys_file!r}")
            keys |= from_file
        return frozenset(keys)

    def storage_settings(self) -> StorageSettings:
        """Where the data lives (``index.storage.backends.open_storage`` opens it in each replica)."""
        return StorageSettings(**{name: getattr(self, name) for name in StorageSettings.model_fields})

    def image_limits(self) -> ImageLimits:
        """How uploaded and fetched images are decoded: ``limits`` plus ``jpeg_draft_decode``."""
        return self.limits.image_limits().model_copy(update={"jpeg_draft_decode": self.jpeg_draft_decode})

    def detection_config(self) -> DetectionConfig:
        """The detection settings (``index.detect.modes.DetectionConfig``)."""
        return DetectionConfig(item_detector=self.item_detector, face_detector=self.face_detector)

    def fetch_policy(self) -> FetchPolicy:
        """Where fetches of client-given URIs (``image_uri``, import sources and the image URIs in
        them) may go: see ``index.ingest.fetch``."""
        return FetchPolicy(
            allowed_file_roots=tuple(self.allowed_file_roots),
            allow_private=self.fetch_allow_private,
            allowed_networks=tuple(self.fetch_allowed_networks),
            max_redirects=self.fetch_max_redirects,
            import_roots=tuple(self.import_roots),
            object_store_allowed={p: tuple(entries) for p, entries in self.object_store_allowed.items()},
            timeout_s=self.limits.fetch_timeout_s,
            source_timeout_s=self.imports.source_timeout_s,
        )

    @field_validator("api_keys")
    @classmethod
    def _usable_keys(cls, keys: list[str]) -> list[str]:
        for i, key in enumerate(keys):
            _check_api_key(key, f"api_keys[{i}]")
        return keys

    @model_validator(mode="before")
    @classmethod
    def _command_line_strings(cls, data: Any) -> Any:
        """``serve run deployments.app:build_app key=value ...`` passes every value as a string: a list
        field takes a JSON list or comma-separated values (``import_roots=/a,/b``), an object field a
        JSON object (``limits='{"max_top_k": 100}'``). Scalars are converted by pydantic itself."""
        if not isinstance(data, dict):
            return data
        if "object_store_protocols" in data:
            # The arg before object_store_allowed let clients name any bucket of the listed protocols.
            raise ValueError(
                "object_store_protocols: replaced by object_store_allowed, which names the buckets or "
                "bucket/prefix entries clients may read per protocol (docs/API.md, 'Object-store URIs')"
            )
        out = dict(data)
        for name, value in data.items():
            field = cls.model_fields.get(name)
            if field is None or not isinstance(value, str):
                continue
            kind = typing.get_origin(field.annotation) or field.annotation
            text = value.strip()
            if kind is list and not text.startswith("["):
                out[name] = [v.strip() for v in text.split(",") if v.strip()]
            elif kind in (list, dict) or (
                isinstance(kind, type) and (issubclass(kind, BaseModel) or dataclasses.is_dataclass(kind))
            ):
                try:
                    out[name] = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{name}: {value[:100]!r} is not valid JSON ({exc.msg})") from None
        return out

    @model_validator(mode="after")
    def _absolute_paths(self) -> AppArgs:
        # Relative paths mean the directory the builder ran in (``serve run`` 's), not each replica's
        # working directory, which Ray chooses.
        self.storage_root = os.path.abspath(self.storage_root)
        if self.database_password_file is not None:
            self.database_password_file = os.path.abspath(self.database_password_file)
        if self.cache_dir is not None:
            self.cache_dir = os.path.abspath(self.cache_dir)
        self.import_roots = [os.path.abspath(p) for p in self.import_roots]
        self.allowed_file_roots = [os.path.abspath(p) for p in self.allowed_file_roots]
        if self.api_keys_file is not None:
            self.api_keys_file = os.path.abspath(self.api_keys_file)
        return self

    @model_validator(mode="after")
    def _dedicated_once(self) -> AppArgs:
        seen: set[tuple[str, int]] = set()
        for i, entry in enumerate(self.dedicated_shards):
            for k in entry.shards:
                if k >= self.limits.max_shards:
                    raise ValueError(
                        f"dedicated_shards[{i}]: shard {k} of {entry.library!r} cannot exist: libraries have "
                        f"at most limits.max_shards = {self.limits.max_shards} shards"
                    )
                if (entry.library, k) in seen:
                    raise ValueError(f"dedicated_shards[{i}]: shard {k} of {entry.library!r} is listed twice")
                seen.add((entry.library, k))
        return self

    @model_validator(mode="after")
    def _import_budget_fits(self) -> AppArgs:
        # the Importer reads a line only with room for it and for the image it may fetch
        imports = self.imports
        if imports.max_task_bytes_in_flight <= imports.max_line_bytes + 2 + self.limits.max_image_bytes:
            raise ValueError(budget_too_small(imports.max_task_bytes_in_flight, imports.max_line_bytes))
        return self

    @model_validator(mode="after")
    def _fetch_policy(self) -> AppArgs:
        self.fetch_policy()  # object_store_allowed's protocols and prefixes, checked at build time
        return self

    @model_validator(mode="after")
    def _storage(self) -> AppArgs:
        self.storage_settings()  # both-or-neither of database_url and object_store_url, named
        return self

    @model_validator(mode="after")
    def _default_pretrained(self) -> AppArgs:
        if self.pretrained is None and self.model in DEFAULT_PRETRAINED:
            self.pretrained = DEFAULT_PRETRAINED[self.model]
        return self


def _check_api_key(key: str, where: str) -> None:
    # An empty key would match a request with no Authorization header at all; whitespace cannot survive
    # the header's parsing. Short keys are guessable.
    if len(key) < 8 or any(c.isspace() for c in key) or not key.isprintable():
        raise ValueError(f"{where}: an API key must be at least 8 printable characters without spaces")
