"""Imports: bulk import tasks of a JSONL source: create, results, cancel (``/image/tasks/...``, tagged
``images`` in the schema).

No ``from __future__ import annotations`` here: FastAPI reads the route signatures.
"""

import re

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from deployments.http import envelope
from deployments.routes.replica import PREFIX, ReplicaDep
from deployments.schemas import CancelTask, CreateTask
from index.errors import InvalidParameter, TaskNotFound
from index.ingest.fetch import FetchError, check_source

#: Task ids are 32 hex digits (uuid4); anything else cannot name a task.
TASK_ID_RE = re.compile(r"[0-9a-f]{32}")

router = APIRouter(prefix=PREFIX, tags=["images"])


@router.post("/image/tasks/create")
async def create_task(body: CreateTask, replica: ReplicaDep) -> JSONResponse:
    """Start a bulk import of a JSONL source; answers ``{"task_id"}`` at once."""
    try:
        check_source(body.source, policy=replica.fetch_policy)  # 400 before the library lookup (404)
    except FetchError as exc:
        raise InvalidParameter(f"source: {exc}") from None
    info = await replica.library(body.library_name)
    task_id = await replica.importer.create_task.remote(info.name, info.uid, body.source, body.save_image)
    return envelope({"task_id": task_id})


@router.get("/image/tasks/results/{task_id}")
async def task_results(task_id: str, replica: ReplicaDep) -> JSONResponse:
    """State, counters and per-line errors of an import task."""
    if not TASK_ID_RE.fullmatch(task_id):
        raise TaskNotFound(task_id[:80])
    return envelope(await replica.importer.get_task.remote(task_id))


@router.post("/image/tasks/cancel")
async def cancel_task(body: CancelTask, replica: ReplicaDep) -> JSONResponse:
    """Cancel a pending or running import task; a finished one is answered unchanged."""
    if not TASK_ID_RE.fullmatch(body.task_id):
        raise TaskNotFound(body.task_id[:80])
    return envelope(await replica.importer.cancel_task.remote(body.task_id))
