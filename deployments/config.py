"""The builder's arguments: everything configurable, validated once, passed down explicitly.

``serve run deployments.app:build_app model=tiny-random storage_root=/tmp/x`` and the ``args:`` of
``serve_config.yaml`` both land here. Deployment-level knobs (replicas, autoscaling, resources, batch
sizes in ``user_config``) live in ``serve_config.yaml``'s ``deployments:`` section instead.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from filters import FilterLimits, TagLimits
from index.fetch import DEFAULT_OBJECT_STORE_PROTOCOLS, FetchPolicy
from index.imaging import ImageLimits
from index.importer import ImportSettings

#: The pretrained tag used when ``pretrained`` is not given, for the models we document.
DEFAULT_PRETRAINED = {
    "ViT-B-32": "laion2b_s34b_b79k",
    "ViT-B-16": "laion2b_s34b_b88k",
    "ViT-L-14": "laion2b_s32b_b82k",
    "xlm-roberta-base-ViT-B-32": "laion5b_s13b_b90k",
}

MiB = 1024 * 1024


class Limits(BaseModel):
    """Input limits; every one is answered with the envelope (400 or 413) when exceeded."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(32 * MiB, gt=0, description="HTTP body size (413 above it)")
    max_image_bytes: int = Field(20 * MiB, gt=0, description="decoded image bytes (413)")
    max_image_pixels: int = Field(40_000_000, gt=0, description="width x height (413; decompression bombs)")
    max_text_chars: int = Field(1000, gt=0, description="query_text length")
    max_top_k: int = Field(1000, gt=0, description="top_k upper bound")
    max_libraries: int = Field(1000, gt=0, description="libraries per deployment")
    max_filter_depth: int = Field(32, gt=0)
    max_filter_conditions: int = Field(1000, gt=0)
    max_tags: int = Field(64, gt=0, description="keys per tag object")
    max_tag_list_length: int = Field(256, gt=0)
    max_tag_string_length: int = Field(1024, gt=0)
    fetch_timeout_s: float = Field(10.0, gt=0, description="fetching image_uri when no image_base64 is sent")

    def image_limits(self) -> ImageLimits:
        return ImageLimits(max_pixels=self.max_image_pixels, max_bytes=self.max_image_bytes)

    def filter_limits(self) -> FilterLimits:
        return FilterLimits(
            max_depth=self.max_filter_depth,
            max_conditions=self.max_filter_conditions,
            max_string_length=self.max_tag_string_length,
        )

    def tag_limits(self) -> TagLimits:
        return TagLimits(
            max_keys=self.max_tags,
            max_list_length=self.max_tag_list_length,
            max_string_length=self.max_tag_string_length,
        )


class AppArgs(BaseModel):
    """Arguments of ``build_app``."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field("ViT-B-32", description="open_clip model name, 'tiny-random', or 'local-dir:/path'")
    pretrained: str | None = Field(
        None,
        description="open_clip pretrained tag or checkpoint file; default: the model's entry in "
        "DEFAULT_PRETRAINED; 'random' for explicit random weights (benchmarks)",
    )
    model_cache_dir: str | None = Field(None, description="where downloaded weights are cached")
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    seed: int = Field(0, description="seed of random-weight models (identical across replicas)")
    storage_root: str = Field("./data", description="directory (or mounted shared volume) for all libraries")
    limits: Limits = Field(default_factory=Limits)
    text_score_center: float = 0.25
    text_score_scale: float = Field(0.04, gt=0)
    allowed_file_roots: list[str] = Field(
        default_factory=list, description="directories that file:// image URIs may point into"
    )
    import_roots: list[str] = Field(
        default_factory=list, description="directories local import sources (JSONL files) may be read from"
    )
    object_store_protocols: list[str] = Field(
        default_factory=lambda: list(DEFAULT_OBJECT_STORE_PROTOCOLS),
        description="fsspec protocols accepted for image URIs and import sources (the protocol's package, "
        "e.g. s3fs or gcsfs, must be installed)",
    )
    imports: ImportSettings = Field(default_factory=ImportSettings, description="bulk import limits, tuning")
    api_keys: list[str] = Field(
        default_factory=list, description="accepted API keys (Authorization: Bearer); empty: no auth"
    )
    api_keys_file: str | None = Field(None, description="file with one API key per line (# comments)")
    deployment_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per-deployment .options() overrides keyed by deployment name (tests, quick runs); "
        "serve_config.yaml's deployments section is the usual place for these",
    )

    def fetch_policy(self) -> FetchPolicy:
        """Where images and import sources may be read from (``index/fetch.py`` applies it)."""
        return FetchPolicy(
            timeout_s=self.limits.fetch_timeout_s,
            allowed_file_roots=tuple(self.allowed_file_roots),
            import_roots=tuple(self.import_roots),
            object_store_protocols=tuple(self.object_store_protocols),
            source_timeout_s=self.imports.source_timeout_s,
        )

    def load_api_keys(self) -> frozenset[str]:
        """Keys from ``api_keys`` and ``api_keys_file`` (read when a replica starts)."""
        keys = set(self.api_keys)
        if self.api_keys_file:
            with open(self.api_keys_file) as f:
                keys.update(ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#"))
        return frozenset(keys)

    @model_validator(mode="after")
    def _default_pretrained(self) -> AppArgs:
        if self.pretrained is None and self.model in DEFAULT_PRETRAINED:
            self.pretrained = DEFAULT_PRETRAINED[self.model]
        return self
