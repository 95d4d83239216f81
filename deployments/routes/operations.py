"""Operations: the web page (``GET /``) and readiness (``GET /health``, also under the API prefix).

No ``from __future__ import annotations`` here: FastAPI reads the route signatures.
"""

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse

from deployments.http import envelope
from deployments.routes.replica import PREFIX, ReplicaDep
from index.errors import Unavailable

RANDOM_WEIGHTS_WARNING = "RANDOM WEIGHTS: embeddings are not meaningful (offline demo/test model)"
#: The web page's files (plain HTML/JS/CSS, no build step), installed as package data.
STATIC_DIR = Path(__file__).parent.parent / "static"

router = APIRouter()


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    """The search page; it loads ``/static/*`` and calls the API with the key the user enters."""
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/health", tags=["operations"])
@router.get(PREFIX + "/health", tags=["operations"])
async def health(replica: ReplicaDep) -> JSONResponse:
    """200 when every deployment has a running replica, else 503 ``UNAVAILABLE`` with the same data:
    each deployment's state, and the model, its device, whether weights are real, library count."""
    ready, deployments, reasons = replica.states.report()
    data: dict[str, Any] = {"ready": ready, "deployments": deployments}
    model = None  # the Encoder is down: reported under "deployments" (and no wait for it here)
    if replica.model is not None or replica.encoder.available():
        with contextlib.suppress(Unavailable):
            model = await replica.model_info()
    if model is not None:
        data |= {
            "model": model["model"],
            "pretrained": not model["random_weights"],
            "weights": model["pretrained"],
            "device": model["device"],
            "dim": model["dim"],
            "detection": replica.pipeline.describe() | {"face_model": model.get("face_identity")},
        }
        if model["random_weights"]:
            data["warning"] = RANDOM_WEIGHTS_WARNING
    data["storage"] = replica.storage_described
    try:
        data["libraries"] = len(await asyncio.to_thread(replica.catalog.names))
    except Unavailable as exc:  # cluster mode: the database is down
        ready = data["ready"] = False
        reasons.append(f"storage: {exc}")
    if not ready:
        return envelope(data, status=Unavailable.status, message="; ".join(reasons), http=503)
    return envelope(data)
