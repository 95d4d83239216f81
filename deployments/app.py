"""The application graph, composed in one place.

    HTTP -> Ingress (FastAPI, CPU)
              |-> Encoder       open_clip, @serve.batch, GPU when present
              |-> LibraryIndex  read path, multiplexed by library
              |-> Writer        single writer: every mutation, snapshots
              '-> Importer      bulk import tasks (one replica) -> Encoder, Writer

``serve run deployments.app:build_app model=tiny-random storage_root=./data`` (offline demo) or
``serve run serve_config.yaml`` / ``serve deploy serve_config.yaml`` (production: real weights).
"""

from __future__ import annotations

import logging
from typing import Any

from ray.serve import Application

from deployments.config import AppArgs
from deployments.encoder import Encoder
from deployments.importer import Importer
from deployments.ingress import Ingress
from deployments.library_index import LibraryIndex
from deployments.writer import Writer
from index.embedder import resolve_model_spec
from index.scores import ScoreCalibration

logger = logging.getLogger("ray.serve")


def build_app(raw_args: dict[str, Any]) -> Application:
    """Typed builder: validates the args, resolves the model spec (cheap: no weights), binds the graph."""
    args = AppArgs.model_validate(raw_args)
    spec = resolve_model_spec(
        args.model,
        pretrained=args.pretrained,
        cache_dir=args.model_cache_dir,
        device=args.device,
        precision=args.precision,
        seed=args.seed,
    )
    if spec.random_weights:
        logger.warning("model %s uses RANDOM WEIGHTS: search results will not be meaningful", spec.identity)
    opts = args.deployment_options
    encoder = Encoder.options(**opts.get("Encoder", {})).bind(spec)
    index = LibraryIndex.options(**opts.get("LibraryIndex", {})).bind(
        args.storage_root, ScoreCalibration(args.text_score_center, args.text_score_scale)
    )
    writer = Writer.options(**opts.get("Writer", {})).bind(args.storage_root, args.limits.max_libraries)
    importer = Importer.options(**opts.get("Importer", {})).bind(encoder, writer, args, spec.preprocess)
    return Ingress.options(**opts.get("Ingress", {})).bind(
        encoder, index, writer, importer, args, spec.preprocess
    )
