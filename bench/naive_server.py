"""The baseline for bench/serving_bench.py: the simplest search server a user would write.

One uvicorn process, one FastAPI route, the model called once per request (no batching), search by a
numpy inner product over the library's vectors. It uses the same model wrapper and the same image
preparation as the service (``index.model``), so the comparison measures serving,
not a different model or different preprocessing.

    python bench/naive_server.py --model ViT-B-32 --pretrained random --port 8100 --library DIR

``--mode sync`` (default) declares the route with ``def``: FastAPI runs it in its thread pool, as its
docs advise for blocking work, so concurrent requests call the model from several threads at once.
``--mode async`` declares it ``async def``: requests run the model one after another on the event loop.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's code, not an installed copy

PREFIX = "/api/v1/operators/image-search"
logger = logging.getLogger("naive_server")


def create_app(model: str, pretrained: str, device: str, library: Path, mode: str) -> Any:
    """Load the model, embed the library's JPEGs, and return the FastAPI app."""
    from fastapi import FastAPI

    from index.model.embedder import ClipEmbedder
    from index.model.imaging import ImageLimits, decode_base64, decode_image, prepare_for_model
    from index.model.spec import resolve_model_spec

    spec = resolve_model_spec(model, pretrained=pretrained, device=device)
    embedder = ClipEmbedder.load(spec)
    embedder.warmup()
    limits = ImageLimits()
    hint = max(spec.preprocess.size)  # the ingress's JPEG draft-mode decode, exactly

    def prepare(data: bytes) -> np.ndarray:
        return prepare_for_model(decode_image(data, limits, min_side_hint=hint), spec.preprocess)

    files = sorted(library.glob("*.jpg"))
    ids = [f.stem for f in files]
    prepared = [prepare(f.read_bytes()) for f in files]
    vectors = np.concatenate(
        [embedder.encode_images(np.stack(prepared[i : i + 16])) for i in range(0, len(files), 16)]
    )

    def search(body: dict[str, Any]) -> dict[str, Any]:
        pixels = prepare(decode_base64(body["image_base64"], max_bytes=limits.max_bytes))
        query = embedder.encode_images(pixels[None])[0]
        scores = vectors @ query
        top = np.argsort(-scores)[: int(body.get("top_k", 10))]
        results = [{"image_id": ids[i], "score": float(max(scores[i], 0.0))} for i in top]
        return {"status": "SUCCESS", "message": None, "data": {"results": results}}

    app = FastAPI()
    if mode == "sync":

        @app.post(PREFIX + "/search/by-image")
        def search_sync(body: dict[str, Any]) -> dict[str, Any]:
            return search(body)

    else:

        @app.post(PREFIX + "/search/by-image")
        async def search_async(body: dict[str, Any]) -> dict[str, Any]:
            return search(body)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "SUCCESS", "message": None, "data": {"model": spec.identity, "images": len(ids)}}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default="random")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--library", type=Path, required=True, help="directory of *.jpg to search")
    parser.add_argument("--mode", choices=("sync", "async"), default="sync")
    args = parser.parse_args()

    import torch
    import uvicorn

    if args.threads:
        torch.set_num_threads(args.threads)
    app = create_app(args.model, args.pretrained, args.device, args.library, args.mode)
    uvicorn.run(app, host="127.0.0.1", port=args.port, workers=1, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
