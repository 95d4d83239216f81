"""The application graph, composed in one place.

    HTTP -> Ingress (FastAPI, CPU)
              |-> Encoder       open_clip, merged batches, GPU when present
              |-> LibraryIndex  read path, multiplexed by library (and shard)
              |-> LibraryIndex-<library>-<shard>  big shards on replicas of their own (dedicated_shards)
              |-> Writer        single writer: every mutation, snapshots
              '-> Importer      bulk import tasks (one replica) -> Encoder, Writer

``serve run deployments.app:build_app model=tiny-random storage_root=./data`` (offline demo) or
``serve run serve_config.yaml`` / ``serve deploy serve_config.yaml`` (production: real weights), or
``serve deploy serve_config.cluster.yaml`` (cluster mode: PostgreSQL + object store, ``index.storage``).
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
from index.detect.faces import cascade_path
from index.model.spec import resolve_model_spec
from index.search.scores import ScoreCalibration
from index.storage.backends import open_storage

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
    face_spec = None
    if args.face_model is not None:
        face_spec = resolve_model_spec(
            args.face_model,
            pretrained=args.face_pretrained,
            cache_dir=args.model_cache_dir,
            device=args.device,
            precision=args.precision,
            seed=args.seed,
        )
        if face_spec.dim != spec.dim:
            raise ValueError(
                f"face_model {args.face_model!r} makes {face_spec.dim}-d vectors but model {args.model!r} "
                f"makes {spec.dim}-d ones; a library holds vectors of one size: pick a face model of the "
                f"same dimension"
            )
        if face_spec.random_weights:
            logger.warning("face model %s uses RANDOM WEIGHTS", face_spec.identity)
    elif args.face_pretrained is not None:
        raise ValueError("face_pretrained is set but face_model is not; set both, or neither")
    if spec.random_weights:
        logger.warning("model %s uses RANDOM WEIGHTS: search results will not be meaningful", spec.identity)
        if args.item_detector.kind == "clip-regions":
            logger.warning("item_detector clip-regions scores regions with RANDOM WEIGHTS: arbitrary choices")
    # Fail the build, not a replica, on a missing cascade file (AppArgs checked the numbers).
    cascade_path(args.face_detector.cascade)
    if args.face_detector.align:
        cascade_path(args.face_detector.eye_cascade)
    opts = args.deployment_options
    # Serve's decorators return Deployment objects the type checker cannot see through.
    encoder = Encoder.options(**opts.get("Encoder", {})).bind(spec, face_spec)  # type: ignore[attr-defined]
    storage = args.storage_settings()
    if storage.cluster:
        # An unreachable database, a wrong password, a database of a newer schema or a missing bucket
        # fails the deploy here, with the reason, instead of every replica failing to start in turn.
        # (An older schema is migrated here too.)
        open_storage(storage).close()
    scores = ScoreCalibration(text_center=args.text_score_center, text_scale=args.text_score_scale)
    index = LibraryIndex.options(**opts.get("LibraryIndex", {})).bind(  # type: ignore[attr-defined]
        storage, scores, args.index, max_filter_work=args.limits.max_filter_work
    )
    # Big shards (args.dedicated_shards): a deployment each, which loads its shard before Serve routes
    # to it. Options: the entry's, then deployment_options under the deployment's name.
    dedicated = [
        (
            entry.library,
            shard,
            LibraryIndex.options(  # type: ignore[attr-defined]
                name=name, **(entry.deployment | opts.get(name, {}))
            ).bind(
                storage,
                scores,
                args.index,
                (entry.library, shard),
                max_filter_work=args.limits.max_filter_work,
            ),
        )
        for entry in args.dedicated_shards
        for shard, name in entry.deployment_names().items()
    ]
    writer = Writer.options(**opts.get("Writer", {})).bind(  # type: ignore[attr-defined]
        storage, args.limits.max_libraries, args.index
    )
    importer = Importer.options(**opts.get("Importer", {})).bind(  # type: ignore[attr-defined]
        encoder, writer, args, spec.preprocess
    )
    ingress = Ingress.options(**opts.get("Ingress", {}))  # type: ignore[attr-defined]
    return ingress.bind(
        encoder,
        index,
        writer,
        importer,
        args,
        spec.preprocess,
        face_spec.preprocess if face_spec else None,
        dedicated,
    )
