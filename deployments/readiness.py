"""Which deployments of this application have a running replica, as Serve's controller sees them.

The ingress asks before it calls a deployment: a call to a deployment with no running replica waits a
bounded time for one (a replica restarting on another node, a rolling update replacing the only one) and
is then answered with 503 ``UNAVAILABLE``, instead of waiting for a replica that may never come (one that
cannot be scheduled) until the proxy's timeout; ``/health`` reports the same state. Idempotent calls
(reads, encoding) are retried when the replica serving them dies (its node was lost).

The controller's view is cached for ``ttl_s``: a stale view is served while one refresh runs in the
background, so a request never waits for the controller once the first view is in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ray.exceptions import RayActorError

from index.errors import Unavailable

logger = logging.getLogger("ray.serve")

#: How old a view may be before the next request refreshes it (in the background).
STATE_TTL_S = 2.0


@dataclass(frozen=True)
class DeploymentState:
    """One deployment as the controller reports it."""

    status: str  # Serve's DeploymentStatus: HEALTHY, UPDATING, UPSCALING, UNHEALTHY, ...
    running: int  # replicas in state RUNNING
    target: int  # the replicas Serve is aiming for
    message: str = ""

    def describe(self) -> dict[str, Any]:
        return {"status": self.status, "running": self.running, "target": self.target}


def parse_states(details: Mapping[str, Any], app_name: str) -> dict[str, DeploymentState]:
    """The deployments of ``app_name`` in a controller's ``get_serve_instance_details`` answer.

    Raises:
        Unavailable: the application is not (or no longer) known to the controller.
    """
    app = (details.get("applications") or {}).get(app_name)
    if app is None:
        raise Unavailable(f"application {app_name!r} is not deployed")
    states = {}
    for name, dep in (app.get("deployments") or {}).items():
        replicas = dep.get("replicas") or []
        states[name] = DeploymentState(
            # The controller hands over Serve's DeploymentStatus enum (a str subclass whose str() is
            # "DeploymentStatus.HEALTHY"): report its value, as `serve status` does.
            status=str(getattr(dep.get("status"), "value", dep.get("status") or "UNKNOWN")),
            running=sum(1 for r in replicas if r.get("state") == "RUNNING"),
            target=int(dep.get("target_num_replicas", 0)),
            message=str(dep.get("message") or ""),
        )
    return states


def unavailable_message(name: str, state: DeploymentState | None) -> str:
    """Why ``name`` cannot take a call, for the envelope's message."""
    if state is None:
        return f"deployment {name!r} is not part of this application"
    text = f"deployment {name!r} has no running replica ({state.running} of {state.target} running"
    text += f", {state.status})"
    if state.message:
        text += f": {state.message[:300]}"
    return text


class DeploymentStates:
    """A cached view of one application's deployments.

    Args:
        app_name: the Serve application this replica belongs to.
        fetch: returns the controller's ``get_serve_instance_details`` dict.
        ttl_s: the age at which a view is refreshed.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        app_name: str,
        fetch: Callable[[], Awaitable[Mapping[str, Any]]],
        ttl_s: float = STATE_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app_name = app_name
        self._fetch = fetch
        self._ttl_s = ttl_s
        self._clock = clock
        self._states: dict[str, DeploymentState] | None = None
        self._error: str | None = None
        self._at = float("-inf")
        self._refreshing: asyncio.Task[None] | None = None

    async def current(self) -> dict[str, DeploymentState] | None:
        """The latest view (None while the controller has never answered). Waits only for the first
        view; later a stale one is returned while a refresh runs in the background."""
        if self._states is None and self._error is None:
            await self._refresh_once()
        elif self._clock() - self._at > self._ttl_s and self._refreshing is None:
            self._refreshing = asyncio.create_task(self._refresh_once())
        return self._states

    async def _refresh_once(self) -> None:
        try:
            details = await self._fetch()
            self._states = parse_states(details, self.app_name)
            self._error = None
        except Unavailable as exc:
            self._states, self._error = None, str(exc)
        except Exception as exc:  # the controller is restarting or unreachable: say so, keep serving
            logger.warning("could not read deployment states from Serve's controller: %r", exc)
            self._error = f"Serve's controller did not answer: {type(exc).__name__}"
        finally:
            self._at = self._clock()
            self._refreshing = None

    def require(self, name: str) -> None:
        """Raise `Unavailable` when the latest view shows no running replica of ``name``.

        Without a view (the controller never answered) calls go through: the view is an early answer
        for a known-dead deployment, never a new way to fail.
        """
        if self._states is None:
            return
        state = self._states.get(name)
        if state is None or state.running == 0:
            raise Unavailable(unavailable_message(name, state))

    async def wait_for(self, name: str, wait_s: float, poll_s: float = 0.25) -> None:
        """Return once ``name`` has a running replica; raise `Unavailable` after ``wait_s`` without one.

        The view is refreshed meanwhile (``ttl_s`` bounds how stale it is), so a replica that starts
        within the wait is seen a few seconds at most after the controller counts it.
        """
        end = self._clock() + wait_s
        while True:
            try:
                self.require(name)
                return
            except Unavailable:
                if self._clock() >= end:
                    raise
            await asyncio.sleep(poll_s)
            await self.current()

    def report(self) -> tuple[bool, dict[str, Any], list[str]]:
        """``(ready, per-deployment state, reasons it is not ready)`` for ``/health``."""
        if self._states is None:
            return False, {}, [self._error or "deployment states not read yet"]
        reasons = [unavailable_message(n, s) for n, s in sorted(self._states.items()) if s.running == 0]
        return not reasons, {n: s.describe() for n, s in sorted(self._states.items())}, reasons


async def controller_details() -> Mapping[str, Any]:
    """Serve's controller's ``get_serve_instance_details()`` (what ``serve status`` shows), awaited
    without blocking the event loop."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    # get_actor is a quick GCS lookup; the answer itself is awaited (no ray.get in a replica).
    controller = await asyncio.to_thread(ray.get_actor, SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    details: Mapping[str, Any] = await controller.get_serve_instance_details.remote()
    return details


class GuardedHandle:
    """A deployment handle whose calls wait at most ``wait_s`` for a running replica, then are refused
    (503 ``UNAVAILABLE``), instead of letting Serve's router wait for one without end.

    ``await guarded.method.remote(...)`` returns the call's result; ``guarded.options(...)`` behaves as
    on the handle itself.

    Args:
        wait_s: how long a call waits for a running replica (``limits.unavailable_wait_s``).
        retries: for idempotent deployments (reads, encoding): times a call is sent again when the
            replica serving it died (``RayActorError``: its node was lost, it crashed). Serve's router
            drops a dead replica, so the retry goes to a live one or waits for a replacement.
    """

    def __init__(
        self, handle: Any, name: str, states: DeploymentStates, *, wait_s: float = 10.0, retries: int = 0
    ) -> None:
        self._handle = handle
        self._name = name
        self._states = states
        self._wait_s = wait_s
        self._retries = retries

    def options(self, **kwargs: Any) -> GuardedHandle:
        return GuardedHandle(
            self._handle.options(**kwargs),
            self._name,
            self._states,
            wait_s=self._wait_s,
            retries=self._retries,
        )

    def available(self) -> bool:
        """Whether the latest view shows a running replica (no wait: for /health, which must answer
        fast whatever is down)."""
        try:
            self._states.require(self._name)
        except Unavailable:
            return False
        return True

    def __getattr__(self, method: str) -> _GuardedMethod:
        return _GuardedMethod(self, method)


@dataclass(frozen=True)
class _GuardedMethod:
    guarded: GuardedHandle
    method: str

    async def remote(self, *args: Any, **kwargs: Any) -> Any:
        g = self.guarded
        attempt = 0
        while True:
            await g._states.wait_for(g._name, g._wait_s)
            try:
                return await getattr(g._handle, self.method).remote(*args, **kwargs)
            except RayActorError as exc:
                if attempt >= g._retries:
                    raise
                attempt += 1
                logger.warning(
                    "%s.%s: the replica died (%s); sending the call again",
                    g._name,
                    self.method,
                    type(exc).__name__,
                )
