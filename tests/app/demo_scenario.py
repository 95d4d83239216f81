"""Run the README's install-and-run command's ``serve run`` exactly as written, then use every route once.

    python -m tests.app.demo_scenario WORKDIR

Started by ``tests/app/test_demo.py``, normally inside a private network namespace so that the
command's fixed port (8000) and Ray's ports cannot clash with anything else on the machine. The
command runs in WORKDIR (its ``./data`` is created there) with no resource overrides: the deployments
ask for what the code and the command ask for, on however many cores the machine has. Exits 0 when
every step behaved as documented; otherwise prints the failing step and exits 1. Every process the
command started is stopped before this one exits.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import requests

REPO = Path(__file__).resolve().parents[2]
BASE = "http://127.0.0.1:8000"
PREFIX = "/api/v1/operators/image-search"
#: Every deployment of the graph (deployments/app.py) must get a running replica.
DEPLOYMENTS = {"Ingress", "Encoder", "LibraryIndex", "Writer", "Importer"}
#: A service this small answers every route well within this (a refusal at once, never a hang).
ROUTE_TIMEOUT_S = 30


def readme_command() -> list[str]:
    """The ``serve run`` part of the README's first command, as argv (``.venv/bin/X`` -> this venv's X)."""
    text = (REPO / "README.md").read_text()
    first = next(ln.strip() for ln in text.splitlines() if ln.startswith("    ") and "serve run" in ln)
    serve_part = next(part.strip() for part in first.split("&&") if " run " in part and "serve" in part)
    argv = shlex.split(serve_part)
    if argv[0].startswith(".venv/bin/"):
        argv[0] = str(Path(sys.executable).parent / argv[0].removeprefix(".venv/bin/"))
    return argv


def arg_value(argv: list[str], key: str) -> str:
    for a in argv:
        if a.startswith(key + "="):
            return a.split("=", 1)[1]
    raise SystemExit(f"the README's command sets no {key}=")


class Steps:
    """Calls the API, records each step, stops at the first failure."""

    def __init__(self) -> None:
        self.s = requests.Session()
        self.done: list[str] = []

    def call(self, method: str, path: str, body: Any = None, *, prefix: bool = True) -> requests.Response:
        start = time.monotonic()
        r = self.s.request(
            method, BASE + (PREFIX if prefix else "") + path, json=body, timeout=ROUTE_TIMEOUT_S
        )
        self.done.append(f"{method} {path} -> {r.status_code} in {time.monotonic() - start:.2f}s")
        return r

    def ok(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        r = self.call(method, path, body)
        env = r.json()
        check(r.status_code == 200 and env["status"] == "SUCCESS", f"{method} {path}: {r.status_code} {env}")
        return env["data"]  # type: ignore[no-any-return]


def check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)


def wait_for(what: str, probe: Callable[[], bool], deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            if probe():
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {deadline_s:.0f}s")


def exercise(import_root: Path) -> list[str]:
    from tests.images import image_b64

    st = Steps()
    health: dict[str, Any] = {}

    def ready() -> bool:
        r = st.s.get(BASE + "/health", timeout=10)
        health.update(r.json())
        return r.status_code == 200

    wait_for("GET /health answering 200", ready, 240)
    data = health["data"]
    check(data["ready"] is True and data["pretrained"] is False, f"health: {health}")
    check(set(data["deployments"]) == DEPLOYMENTS, f"deployments in /health: {data['deployments']}")
    for name, state in data["deployments"].items():
        check(state["running"] >= 1, f"{name} has no running replica: {state}")

    check(st.call("GET", "/", prefix=False).status_code == 200, "the web page")
    check(st.call("GET", "/openapi.json", prefix=False).status_code == 200, "the OpenAPI schema")
    lib = "demo_" + uuid.uuid4().hex[:8]
    st.ok("POST", "/library/create", {"library_name": lib, "mode": "general_search"})
    check(lib in [x["library_name"] for x in st.ok("GET", "/library/list")["libraries"]], "library/list")
    check(st.ok("GET", f"/library/{lib}")["library_name"] == lib, "library/{name}")
    for i, colour in enumerate(["white", "blue", "red"]):
        st.ok(
            "POST",
            "/image/add",
            {
                "library_name": lib,
                "image_id": f"img{i}",
                "image_uri": f"https://example.com/img{i}.png",
                "image_base64": image_b64(i),
                "tags": {"color": colour, "price": 10 * i},
            },
        )
    got = st.ok("POST", "/image/get", {"library_name": lib, "image_id": "img1"})["images"]
    check(len(got) == 1 and got[0]["tags"]["color"] == "blue", f"image/get: {got}")
    st.ok("POST", "/image/update_tags", {"library_name": lib, "image_id": "img1", "tags": {"color": "green"}})
    hits = st.ok(
        "POST",
        "/search/by-image",
        {
            "library_name": lib,
            "image_base64": image_b64(0),
            "top_k": 3,
            "tag_filter": [{"field": "color", "op": "in", "value": ["white", "green"]}],
        },
    )["results"]
    check([h["image_id"] for h in hits][:1] == ["img0"] and len(hits) == 2, f"search/by-image: {hits}")
    check(
        len(st.ok("POST", "/search/by-text", {"library_name": lib, "query_text": "a photo"})["results"]) == 3,
        "search/by-text",
    )
    by_id = st.ok("POST", "/search/by-id", {"library_name": lib, "image_id": "img2", "top_k": 1})["results"]
    check(by_id[0]["image_id"] == "img2", f"search/by-id: {by_id}")

    # The README's offline import example: inline images in a JSONL file under import_roots.
    source = import_root / "demo.jsonl"
    lines = [
        {
            "image_id": f"imp{i}",
            "image_uri": f"https://example.com/imp{i}.jpg",
            "image_base64": image_b64(100 + i, "JPEG"),
            "tags": {"batch": "demo"},
        }
        for i in range(4)
    ]
    source.write_text("".join(json.dumps(x) + "\n" for x in lines))
    task_id = st.ok("POST", "/image/tasks/create", {"library_name": lib, "source": str(source)})["task_id"]
    task: dict[str, Any] = {}

    def finished() -> bool:
        task.update(st.ok("GET", f"/image/tasks/results/{task_id}"))
        return task["state"] not in ("PENDING", "RUNNING")

    wait_for(f"import task {task_id} finishing", finished, 120)
    check(
        task["state"] == "SUCCEEDED" and (task["total"], task["succeeded"], task["failed"]) == (4, 4, 0),
        f"import task: {task}",
    )
    check(
        st.ok("POST", "/image/get", {"library_name": lib, "image_id": "imp3"})["images"][0]["tags"]
        == {"batch": "demo"},
        f"imported image: {task}",
    )
    # A source on a literal loopback address is refused at once, as the fetch would refuse it.
    r = st.call("POST", "/image/tasks/create", {"library_name": lib, "source": "http://127.0.0.1:9/x.jsonl"})
    check(
        r.status_code == 400 and "not a public address" in r.json()["message"], f"loopback source: {r.text}"
    )

    check(st.ok("POST", "/image/delete", {"library_name": lib, "image_id": "img2"})["deleted"] == 1, "delete")
    st.ok("POST", "/library/delete", {"library_name": lib})
    return st.done


def service_processes(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get("IMAGE_SEARCH_DEMO_RUN") == marker:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def main(workdir: str) -> int:
    work = Path(workdir)
    argv = readme_command()
    import_root = (work / arg_value(argv, "import_roots").split(",")[0]).resolve()
    import_root.mkdir(parents=True, exist_ok=True)
    marker = uuid.uuid4().hex
    env = os.environ | {
        "IMAGE_SEARCH_DEMO_RUN": marker,  # finds every process the command starts, to stop them all
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ADDRESS": "local",  # never attach to another Ray instance on the machine
        "PYTHONPATH": str(REPO),  # this checkout's code, whatever an editable install points at
    }
    with open(work / "serve_run.log", "wb") as log:
        print("running:", shlex.join(argv), flush=True)
        proc = subprocess.Popen(argv, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            steps = exercise(import_root)
            print("\n".join(steps))
            print("DEMO OK", flush=True)
            return 0
        except AssertionError as exc:
            print(f"DEMO FAILED: {exc}", flush=True)
            tail = (work / "serve_run.log").read_bytes()[-6000:].decode(errors="replace")
            print(re.sub(r"\x1b\[[0-9;]*m", "", tail))
            return 1
        finally:
            proc.send_signal(signal.SIGINT)  # what Ctrl-C does: serve run shuts Serve and its Ray down
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
            for p in service_processes(marker):
                p.kill()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
