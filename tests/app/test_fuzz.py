"""Schema-based fuzzing of the served OpenAPI spec with schemathesis: no request ever gets a 5xx.

Both generation modes run: valid requests (per the schema) and invalid ones (the schema broken on purpose:
wrong types, missing fields, extra fields). Every answer must be below 500 and be the envelope. The example
count per operation is bounded and the run is deterministic, so CI time stays flat (about a minute here).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.app.conftest import API_KEY, Client
from tests.filters.strategies import tag_sets, to_json, trees
from tests.images import image_b64

pytestmark = pytest.mark.ray

MAX_EXAMPLES = 25  # per operation and generation mode


def _schema() -> schemathesis.BaseSchema:
    from deployments.ingress import api

    loaded = schemathesis.openapi.from_dict(api.openapi())
    loaded.config.generation.update(
        modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
        max_examples=MAX_EXAMPLES,
        deterministic=True,  # the same examples on every run: a failure reproduces, CI time is stable
        no_shrink=True,
        database="none",
    )

    @loaded.hook
    def flatmap_body(context, body):
        if not isinstance(body, dict) or "library_name" not in body:
            return st.just(body)
        if context.operation is not None and context.operation.path.endswith("/library/delete"):
            return st.just(body)  # the target library must survive the run
        aimed = {**body, "library_name": FUZZ_LIB}
        # Valid parts where the schema only says "any JSON": filters and tags from the filters tests'
        # strategies (their fields a, b, c are the fixture's tag names), and a real image.
        valid = {key: st.just(value) for key, value in aimed.items()}
        if "tag_filter" in body:
            valid["tag_filter"] = st.one_of(st.none(), trees(max_leaves=6).map(to_json))
        if "tags" in body:
            valid["tags"] = tag_sets
        if isinstance(body.get("image_base64"), str):
            valid["image_base64"] = st.just(FUZZ_IMAGE)
        # URIs the service parses (image_uri is fetched when image_base64 is absent; source always is):
        # odd hosts, brackets, ports and schemes, which urlsplit can raise on (issue 26: those were 500s)
        for field in ("image_uri", "source"):
            if isinstance(body.get(field), str):
                valid[field] = st.one_of(st.just(body[field]), odd_uris)
        # the valid variant first: hypothesis leans towards the first branch of one_of
        return st.one_of(st.fixed_dictionaries(valid), st.just(aimed), st.just(body))

    return loaded


odd_uris = st.builds(
    "{}://{}{}{}".format,
    st.sampled_from(["http", "https", "s3", "gs", "file", "simplecache::s3", "ftp"]),
    st.one_of(st.text(max_size=12), st.text(max_size=12).map("[{}]".format)),
    st.one_of(st.just(""), st.integers(-1, 10**6).map(":{}".format), st.text(max_size=6).map(":{}".format)),
    st.text(max_size=12).map("/{}".format),
)

#: Random library names almost never exist, so on their own the fuzzed requests would stop at the 404.
#: Half of the bodies are pointed at this library (a few tagged images, see the fixture) and, for image
#: fields, given a real image, so that fuzzed tags, filters, top_k and flags reach the index and writer.
FUZZ_LIB = "fuzz_target"
FUZZ_IMAGE = image_b64(11)


#: The schema the ingress serves, built from the same FastAPI app object at collection time (the tests
#: below need their operations before the service is up); test_the_served_schema_is_the_fuzzed_one checks
#: that /openapi.json is exactly this.
schema = _schema()


@pytest.fixture(scope="module")
def fuzz_library(client: Client) -> Iterator[str]:
    client.ok("/library/create", {"library_name": FUZZ_LIB, "mode": "general_search"})
    for i, tags in enumerate([{"a": "a", "b": 1}, {"a": ["ab", "b"], "b": 2.5, "c": True}, {"c": "é"}]):
        body = {"library_name": FUZZ_LIB, "image_id": f"f{i}", "image_uri": "u", "image_base64": image_b64(i)}
        client.ok("/image/add", {**body, "tags": tags})
    yield FUZZ_LIB
    client.post("/library/delete", {"library_name": FUZZ_LIB})


def test_the_served_schema_is_the_fuzzed_one(base_url):
    from deployments.ingress import api

    assert requests.get(base_url + "/openapi.json", timeout=30).json() == api.openapi()


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_request_gets_a_5xx(case, base_url, fuzz_library):
    response = case.call(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    detail = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
    assert response.status_code < 500, detail
    content_type = response.headers.get("content-type", [""])[0]  # schemathesis: header -> list of values
    if content_type.startswith("application/json"):
        body = json.loads(response.content)
        if case.path != "/openapi.json":
            assert set(body) == {"status", "message", "data"}, detail
            assert (body["status"] == "SUCCESS") == (response.status_code == 200), detail
