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


def test_guarded_handle_refuses_before_the_call_and_keeps_options() -> None:
    class Handle:
        def __init__(self, model_id: str = "") -> None:
            self.model_id = model_id

        def options(self, multiplexed_model_id: str) -> Handle:
            return Handle(multiplexed_model_id)

        @property
        def search(self) -> str:
            return f"search@{self.model_id}"

    states = DeploymentStates(
        "app", Controller(details(Index=("HEALTHY", 1, 1), Importer=("UPDATING", 0, 1)))
    )
    asyncio.run(states.current())
    assert GuardedHandle(Handle(), "Index", states).options(multiplexed_model_id="lib").search == "search@lib"
    with pytest.raises(Unavailable):
        _ = GuardedHandle(Handle(), "Importer", states).search
