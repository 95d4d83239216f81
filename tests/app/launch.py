"""Run the service as a process of its own, on a fresh private Ray cluster (for the crash test).

    python -m tests.app.launch ARGS_JSON_FILE PORT RAY_TEMP_DIR

``ray.init(address="local")`` always starts a new local cluster, never attaching to another one on the
machine (the test session's, or another engineer's); the cluster gets its own temp dir (its sockets,
logs and session files) and Serve its own HTTP port. Every process of the cluster (GCS, raylet, agents,
workers, replicas) is a descendant of this one, so the caller can find and kill them all by pid. Prints
``READY`` once the app answers; then sleeps until killed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main(args_file: str, port: int, temp_dir: str) -> None:
    import ray
    from ray import serve

    from deployments.app import build_app

    repo = str(Path(__file__).resolve().parents[2])
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _temp_dir=temp_dir,
        runtime_env={"env_vars": {"PYTHONPATH": repo, "RAY_USAGE_STATS_ENABLED": "0"}},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(json.loads(Path(args_file).read_text())), name="service", route_prefix="/")
    print("READY", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
