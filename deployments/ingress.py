"""Ingress deployment: the REST routes of ``../shared/spec/API.md`` on FastAPI.

The routes live in ``deployments/routes/``, one module per resource (operations, libraries, images,
imports, search); this module builds the app (middlewares, error handlers, the web page's files, the
routers in matching order) and the ``Ingress`` deployment, a ``routes.replica.Replica`` that holds the
replica's handles, pools, limits and storage. Each replica serves an app of its own, built in the replica
with the replica on its state (``replica_app``): no app object is shared, or mutated after import.

It validates (pydantic at the edge, ``filters`` for tags and tag_filter), decodes uploads and runs the
library mode's detection and cropping (``index.detect.modes.ModePipeline``) in worker threads (CPUs are here;
the encoder only receives compact uint8 arrays), and forwards to the Encoder, the LibraryIndex (reads,
through the query layer's plans, ``index.query``) and the Writer (mutations).
"""

from __future__ import annotations

from fastapi import Depends, FastAPI, Request
from fastapi.staticfiles import StaticFiles
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.config import AppArgs
from deployments.http import (
    ApiKeyAuth,
    BodyLimit,
    ConcurrencyLimit,
    RequestLog,
    RequestRecorder,
    UnhandledErrors,
    install_error_handlers,
)
from deployments.readiness import DeploymentStates, GuardedHandle, controller_details
from deployments.routes import ROUTERS
from deployments.routes.operations import STATIC_DIR
from deployments.routes.replica import PREFIX, Replica
from deployments.searchers import IndexHandles
from index.model.spec import PreprocessSpec

__all__ = ["PREFIX", "Ingress", "api", "build_api", "note_library", "replica_app"]


async def note_library(request: Request) -> None:
    """Put the request's ``library_name`` (path or JSON body) where the request log finds it.

    A dependency of every route: it runs after FastAPI has parsed the body (``request.json()`` returns
    that cached parse) and before the body is validated, so invalid requests are attributed too.
    """
    name = request.path_params.get("library_name")
    if name is None and request.method == "POST":
        try:
            body = await request.json()
        except Exception:  # not JSON: FastAPI answers 400 for it; there is no name to log
            body = None
        name = body.get("library_name") if isinstance(body, dict) else None
    if isinstance(name, str):
        request.state.library_name = name


async def read_deployment_states(request: Request) -> None:
    """Bring the replica's view of the deployments up to date (in the background once it has one), so
    that a call to a deployment with no running replica is refused at once (`GuardedHandle`)."""
    await request.app.state.deployment_states.current()


def build_api() -> FastAPI:
    """The app: error handlers, the web page's files, the middlewares, the routers (``ROUTERS``, in
    matching order). Each replica builds its own (``replica_app``); nothing here reads its state."""
    app = FastAPI(
        title="Image Search API",
        version="1.0",
        description="Search image libraries by image or by text, with tag filters. "
        "Every response is the envelope {status, message, data}.",
        dependencies=[Depends(note_library), Depends(read_deployment_states)],
    )
    install_error_handlers(app)
    # Mounted at /static (not /): a catch-all mount would shadow the API routes included after it.
    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
    # add_middleware puts each new one outside the previous: RequestLog runs first and sees every answer;
    # ApiKeyAuth refuses a caller before any body is read or any concurrency slot is taken;
    # UnhandledErrors, innermost, answers what no exception handler took.
    app.add_middleware(UnhandledErrors)
    app.add_middleware(BodyLimit)
    app.add_middleware(ConcurrencyLimit)
    app.add_middleware(ApiKeyAuth)
    app.add_middleware(RequestLog)
    for router in ROUTERS:
        app.include_router(router)
    return app


#: The API's schema (``/openapi.json`` of every replica's app; tests, docs). Never served itself.
api = build_api()


def replica_app(replica: Replica, recorder: RequestRecorder | None = None) -> FastAPI:
    """The app one replica serves, its state filled from the replica: read per request by the routes
    (``replica``) and the middlewares (limits, API keys, the request recorder)."""
    app = build_api()
    app.state.replica = replica
    app.state.max_body_bytes = replica.limits.max_body_bytes
    app.state.max_concurrent_requests = replica.limits.max_concurrent_requests
    app.state.api_keys = replica.args.load_api_keys()
    app.state.request_recorder = recorder
    app.state.deployment_states = replica.states
    return app


# max_ongoing_requests sits above limits.max_concurrent_requests (64 by default): the ingress sheds load
# itself with the envelope before Serve's proxy would queue (or answer its own plain-text 503).
# graceful_shutdown_timeout_s: a replica being replaced (rolling update, downscale) finishes the requests
# it holds; one may wait limits.unavailable_wait_s for another deployment's replica, twice (by-id on a
# sharded library), so Serve's default 20 s would kill it mid-request (a plain-text 500 from the proxy).
@serve.deployment(
    ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=80, graceful_shutdown_timeout_s=60
)
@serve.ingress()
class Ingress(Replica):
    """The replica's state is a ``Replica``'s (the routes' view of it): the constructor wraps the handles
    Serve passes in; then Serve asks for the app to serve (``__serve_build_asgi_app__``), built here, in
    the replica, with the replica on its state."""

    def __init__(
        self,
        encoder: DeploymentHandle,
        index: DeploymentHandle,
        writer: DeploymentHandle,
        importer: DeploymentHandle,
        args: AppArgs,
        preprocess: PreprocessSpec,
        face_preprocess: PreprocessSpec | None = None,
        dedicated: list[tuple[str, int, DeploymentHandle]] | None = None,
    ) -> None:
        # Every call to another deployment is refused with 503 UNAVAILABLE while it has no running
        # replica, instead of waiting for one until the proxy times out.
        states = DeploymentStates(serve.get_replica_context().app_name, controller_details)
        # Every call to another deployment waits at most limits.unavailable_wait_s for a running replica,
        # then is refused with 503 UNAVAILABLE. Reads and encoding are idempotent: a call whose replica
        # died (its node was lost) is sent again; writes are not (the first may have committed).
        wait_s = args.limits.unavailable_wait_s

        def guarded(handle: DeploymentHandle, retries: int = 0) -> GuardedHandle:
            return GuardedHandle(handle, handle.deployment_name, states, wait_s=wait_s, retries=retries)

        super().__init__(
            encoder=guarded(encoder, retries=2),
            # Shards with LibraryIndex deployments of their own (AppArgs.dedicated_shards); every other
            # shard goes to the shared, multiplexed LibraryIndex.
            index=IndexHandles(
                guarded(index, retries=2),
                {(library, shard): guarded(h, retries=2) for library, shard, h in dedicated or ()},
            ),
            writer=guarded(writer),
            importer=guarded(importer),
            states=states,
            args=args,
            preprocess=preprocess,
            face_preprocess=face_preprocess,
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        return replica_app(self, RequestRecorder.for_replica())
