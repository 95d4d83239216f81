"""Autoscaling the Encoder on the items it holds, not on the calls it receives:
:func:`ongoing_items_policy` applies Serve's rule (``replicas = items / target_ongoing_requests``) to the
items each replica reports (``Encoder.record_autoscaling_stats``); Serve applies the rest of
``autoscaling_config`` (bounds, delays). Why, and how to select it in ``serve_config.yaml``:
docs/operations.md, "GPU replicas".
"""

from __future__ import annotations

from typing import Any

#: The name of the Encoder's custom autoscaling metric.
ONGOING_ITEMS_METRIC = "ongoing_items"


def ongoing_items_policy(ctx: Any) -> tuple[float, dict[str, Any]]:
    """Desired Encoder replicas from the items they hold (a Serve custom autoscaling policy).

    Args:
        ctx: Serve's ``AutoscalingContext``: ``aggregated_metrics[ONGOING_ITEMS_METRIC]`` maps each
            running replica to its items, averaged over ``look_back_period_s``; ``config`` is the
            deployment's ``AutoscalingConfig``.

    Returns:
        ``(desired replicas, policy state)``; Serve rounds, bounds and delays the number. Before any
        replica has reported items (replicas starting), the current target is kept unless calls are
        waiting, which Serve's default rule then handles (one call counted as one item).
    """
    target = float(ctx.config.get_target_ongoing_requests())
    per_replica = (ctx.aggregated_metrics or {}).get(ONGOING_ITEMS_METRIC) or {}
    if per_replica:
        items = float(sum(per_replica.values()))
    elif ctx.total_num_requests > 0:
        items = float(ctx.total_num_requests)
    else:
        return float(ctx.target_num_replicas), {}
    return items / target, {}
