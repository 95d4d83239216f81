"""The Encoder's autoscaling policy: replicas from the items they hold, Serve's rule otherwise."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy

from deployments.autoscaling import ONGOING_ITEMS_METRIC, ongoing_items_policy


def context(
    items: dict[str, float] | None, *, calls: float = 0, target: float = 128, current: int = 2
) -> Any:
    config = AutoscalingConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=target)
    metrics = {ONGOING_ITEMS_METRIC: items} if items is not None else {}
    return SimpleNamespace(
        config=config,
        aggregated_metrics=metrics,
        total_num_requests=calls,
        current_num_replicas=current,
        target_num_replicas=current,
    )


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        ({"r1": 128.0, "r2": 128.0}, 2.0),  # on target: stay
        ({"r1": 300.0, "r2": 340.0}, 5.0),  # 640 items at 128 each: five replicas
        ({"r1": 10.0, "r2": 0.0}, 10 / 128),  # light load: Serve rounds up and applies min_replicas
        ({"r1": 0.0, "r2": 0.0}, 0.0),
    ],
)
def test_desired_replicas_follow_the_items_not_the_calls(items: dict[str, float], expected: float) -> None:
    # 4 calls in flight would keep 2 replicas under Serve's default rule; the items decide here
    desired, state = ongoing_items_policy(context(items, calls=4))
    assert desired == pytest.approx(expected)
    assert state == {}


def test_before_any_replica_reports_items_calls_count_as_items() -> None:
    assert ongoing_items_policy(context(None, calls=512, current=1)) == (4.0, {})
    assert ongoing_items_policy(context({}, calls=0, current=3)) == (3.0, {})  # nothing known: keep


def test_serve_config_can_name_it() -> None:
    policy = AutoscalingPolicy(policy_function="deployments.autoscaling:ongoing_items_policy")
    assert policy.get_policy()(context({"r1": 256.0})) == (2.0, {})
