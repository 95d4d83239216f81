"""Deployment states from Serve's controller: parsed, cached, and used to refuse calls at once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from deployments.readiness import DeploymentStates, GuardedHandle, parse_states
from index.errors import Unavailable


def details(**deployments: tuple[str, int, int]) -> dict[str, Any]:
    """A controller answer for app ``app``: name -> (status, running replicas, target)."""
    return {
        "applications": {
            "app": {
                "deployments": {
                    name: {
                        "status": status,
                        "message": "" if running else "1 replicas have taken more than 30s to be scheduled",
                        "target_num_replicas": target,
                        "replicas": [{"state": "RUNNING"}] * running + [{"state": "PENDING_ALLOCATION"}],
                    }
                    for name, (status, running, target) in deployments.items()
                }
            }
        }
    }


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Controller:
    def __init__(self, answer: dict[str, Any]) -> None:
        self.answer = answer
        self.calls = 0

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_parse_counts_running_replicas_and_target() -> None:
    states = parse_states(details(Encoder=("HEALTHY", 2, 2), Importer=("UPDATING", 0, 1)), "app")
    assert (states["Encoder"].running, states["Encoder"].target) == (2, 2)
    assert (states["Importer"].running, states["Importer"].target, states["Importer"].status) == (
        0,
        1,
        "UPDATING",
    )


def test_parse_reports_serves_status_enum_by_its_value() -> None:
    from ray.serve._private.common import DeploymentStatus

    answer = details(Encoder=("HEALTHY", 1, 1))
    answer["applications"]["app"]["deployments"]["Encoder"]["status"] = DeploymentStatus.HEALTHY
    assert parse_states(answer, "app")["Encoder"].status == "HEALTHY"


def test_parse_refuses_an_unknown_application() -> None:
    with pytest.raises(Unavailable, match="'other' is not deployed"):
        parse_states(details(Encoder=("HEALTHY", 1, 1)), "other")


def test_require_names_the_deployment_without_replicas() -> None:
    states = DeploymentStates(
        "app", Controller(details(Encoder=("HEALTHY", 1, 1), Importer=("UPDATING", 0, 1)))
    )
    asyncio.run(states.current())
    states.require("Encoder")
    with pytest.raises(
        Unavailable, match=r"'Importer' has no running replica \(0 of 1 running, UPDATING\)"
    ) as e:
        states.require("Importer")
    assert e.value.http_status == 503 and e.value.status == "UNAVAILABLE"
    assert "scheduled" in e.value.message
    with pytest.raises(Unavailable, match="'Nope' is not part of this application"):
        states.require("Nope")


def test_report_is_ready_only_when_every_deployment_runs() -> None:
    ok = DeploymentStates("app", Controller(details(A=("HEALTHY", 1, 1), B=("HEALTHY", 2, 2))))
    asyncio.run(ok.current())
    assert ok.report() == (
        True,
        {
            "A": {"status": "HEALTHY", "running": 1, "target": 1},
            "B": {"status": "HEALTHY", "running": 2, "target": 2},
        },
        [],
    )
    bad = DeploymentStates("app", Controller(details(A=("HEALTHY", 1, 1), B=("UPDATING", 0, 1))))
    asyncio.run(bad.current())
    ready, states, reasons = bad.report()
    assert not ready and states["B"]["running"] == 0 and len(reasons) == 1 and "'B'" in reasons[0]


def test_a_stale_view_is_served_while_one_refresh_runs() -> None:
    async def scenario() -> None:
        clock = Clock()
        controller = Controller(details(A=("HEALTHY", 1, 1)))
        states = DeploymentStates("app", controller, ttl_s=2.0, clock=clock)
        await states.current()
        await states.current()
        assert controller.calls == 1  # fresh: no call
        controller.answer = details(A=("UNHEALTHY", 0, 1))
        clock.t = 5.0
        view = await states.current()
        assert view is not None and view["A"].running == 1  # the stale view, at once
        await states.current()  # a refresh is already running: no second one
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert controller.calls == 2
        with pytest.raises(Unavailable):
            states.require("A")

    asyncio.run(scenario())


def test_without_an_answer_calls_go_through_but_health_is_not_ready() -> None:
    states = DeploymentStates("app", Controller(RuntimeError("controller restarting")))  # type: ignore[arg-type]
    asyncio.run(states.current())
    states.require("A")  # no view: the call is not refused on a guess
    ready, _, reasons = states.report()
    assert not ready and reasons == ["Serve's controller did not answer: RuntimeError"]


class Method:
    """A handle method: ``remote`` returns an awaitable, as Serve's DeploymentResponse is."""

    def __init__(self, handle: Handle, name: str) -> None:
        self.handle, self.name = handle, name

    def remote(self, *args: Any) -> Any:
        async def answer() -> str:
            self.handle.calls += 1
            if self.handle.failures:
                self.handle.failures -= 1
                from ray.exceptions import ActorDiedError

                raise ActorDiedError()
            return f"{self.name}@{self.handle.model_id}{args}"

        return answer()


class Handle:
    def __init__(self, model_id: str = "", failures: int = 0) -> None:
        self.model_id = model_id
        self.failures = failures
        self.calls = 0

    def options(self, multiplexed_model_id: str) -> Handle:
        return Handle(multiplexed_model_id, self.failures)

    def __getattr__(self, name: str) -> Method:
        return Method(self, name)


def test_guarded_handle_calls_through_with_its_options() -> None:
    states = DeploymentStates("app", Controller(details(Index=("HEALTHY", 1, 1))))
    guarded = GuardedHandle(Handle(), "Index", states, wait_s=0)
    assert asyncio.run(guarded.options(multiplexed_model_id="lib").search.remote(1)) == "search@lib(1,)"


def test_guarded_handle_refuses_after_waiting_for_a_replica() -> None:
    states = DeploymentStates("app", Controller(details(Importer=("UPDATING", 0, 1))), ttl_s=0)
    handle = Handle()

    async def call() -> None:
        await states.current()
        await GuardedHandle(handle, "Importer", states, wait_s=0.3).create.remote()

    with pytest.raises(Unavailable, match="'Importer' has no running replica"):
        asyncio.run(call())
    assert handle.calls == 0  # refused before the call


def test_guarded_handle_waits_for_a_replacement_replica() -> None:
    """A rolling update or a node loss leaves no running replica for a moment: the call waits for the
    replacement instead of failing."""
    controller = Controller(details(Encoder=("UPDATING", 0, 1)))
    states = DeploymentStates("app", controller, ttl_s=0)

    async def call() -> str:
        await states.current()

        async def replacement_starts() -> None:
            await asyncio.sleep(0.3)
            controller.answer = details(Encoder=("HEALTHY", 1, 1))

        started = asyncio.create_task(replacement_starts())
        result = await GuardedHandle(Handle(), "Encoder", states, wait_s=30).embed.remote()
        await started
        return result

    assert asyncio.run(call()) == "embed@()"


def test_guarded_handle_retries_idempotent_calls_whose_replica_died() -> None:
    states = DeploymentStates("app", Controller(details(Index=("HEALTHY", 1, 1))))
    retried = Handle(failures=2)
    assert asyncio.run(GuardedHandle(retried, "Index", states, retries=2).search.remote()) == "search@()"
    assert retried.calls == 3
    from ray.exceptions import ActorDiedError

    once = Handle(failures=1)
    with pytest.raises(ActorDiedError):  # writes are not retried: the first call may have committed
        asyncio.run(GuardedHandle(once, "Writer", states).add.remote())
    assert once.calls == 1


def test_available_answers_from_the_view_without_waiting() -> None:
    states = DeploymentStates("app", Controller(details(Index=("HEALTHY", 1, 1), Encoder=("UPDATING", 0, 1))))
    asyncio.run(states.current())
    assert GuardedHandle(Handle(), "Index", states, wait_s=30).available() is True
    assert GuardedHandle(Handle(), "Encoder", states, wait_s=30).available() is False
