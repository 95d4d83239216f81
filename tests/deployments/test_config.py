"""deployments.config: every limit is configurable and validated; API keys; the fetch policy."""

from __future__ import annotations

import ipaddress

import pytest
from pydantic import ValidationError

from deployments.config import AppArgs, Limits
from deployments.routes.search import shard_request
from deployments.schemas import SearchByText


def test_limits_reach_the_objects_that_enforce_them():
    limits = Limits(
        max_image_pixels=100,
        max_image_bytes=200,
        image_formats=["png", "JPEG"],
        max_filter_depth=2,
        max_filter_conditions=3,
        max_filter_in_values=4,
        max_filter_cost=9,
        max_tags=5,
        max_tag_key_length=6,
        max_tag_list_length=7,
        max_tag_string_length=8,
    )
    img = limits.image_limits()
    assert (img.max_pixels, img.max_bytes, img.formats) == (100, 200, ("PNG", "JPEG"))
    assert AppArgs(limits=limits).image_limits() == img  # reduced-scale JPEG decoding on by default
    exact = AppArgs(limits=limits, jpeg_draft_decode=False).image_limits()
    assert exact == img.model_copy(update={"jpeg_draft_decode": False}) and not exact.jpeg_draft_decode
    flt = limits.filter_limits()
    assert (flt.max_depth, flt.max_conditions, flt.max_in_values, flt.max_string_length) == (2, 3, 4, 8)
    assert flt.max_cost == 9
    # max_filter_work needs the data: it travels with every shard's request to the LibraryIndex.
    body = SearchByText(library_name="lib", query_text="x", tag_filter=[])
    assert shard_request(body, limits.model_copy(update={"max_filter_work": 1234})).max_filter_work == 1234
    tags = limits.tag_limits()
    assert (tags.max_keys, tags.max_key_length, tags.max_list_length, tags.max_string_length) == (5, 6, 7, 8)


@pytest.mark.parametrize(
    "limits, field",
    [
        ({"max_body_bytes": 0}, "max_body_bytes"),
        ({"max_top_k": 1001}, "max_top_k"),  # the contract's 1..1000: config may only lower it
        ({"max_text_chars": 5000}, "max_text_chars"),
        ({"image_formats": []}, "image_formats"),
        ({"image_formats": ["NOPE"]}, "image_formats"),
        ({"max_concurrent_requests": 0}, "max_concurrent_requests"),
        ({"max_tag": 5}, "max_tag"),  # a typo is an error, not a silently ignored key
        ({"max_filter_work": 0}, "max_filter_work"),
        ({"max_filter_work": 10**12 + 1}, "max_filter_work"),
    ],
)
def test_bad_limits_are_refused(limits, field):
    with pytest.raises(ValidationError, match=field):
        AppArgs(model="tiny-random", limits=limits)


@pytest.mark.parametrize("key", ["", "short", "has space 123", "tab\there123"])
def test_unusable_api_keys_are_refused(key):
    # an empty key would have matched a request without any Authorization header
    with pytest.raises(ValidationError, match="api_keys"):
        AppArgs(model="tiny-random", api_keys=[key])


def test_api_keys_from_config_and_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# comment\n\nfile-key-0001\n  file-key-0002  \n")
    args = AppArgs(model="tiny-random", api_keys=["config-key-01"], api_keys_file=str(path))
    assert args.load_api_keys() == {"config-key-01", "file-key-0001", "file-key-0002"}


def test_an_api_keys_file_without_keys_fails_instead_of_opening_the_service(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# nothing here yet\n")
    with pytest.raises(ValueError, match="holds no API key"):
        AppArgs(model="tiny-random", api_keys_file=str(path)).load_api_keys()
    path.write_text("abc\n")
    with pytest.raises(ValueError, match="at least 8"):
        AppArgs(model="tiny-random", api_keys_file=str(path)).load_api_keys()
    with pytest.raises(OSError):
        AppArgs(model="tiny-random", api_keys_file=str(tmp_path / "missing")).load_api_keys()


def test_fetch_policy_defaults_are_safe_and_configurable():
    policy = AppArgs(model="tiny-random").fetch_policy()
    assert policy.allow_private is False and policy.allowed_networks == () and policy.allowed_file_roots == ()
    assert policy.schemes == ("http", "https")
    args = AppArgs(
        model="tiny-random",
        fetch_allowed_networks=["10.1.2.0/24", "fd00::/8"],
        fetch_max_redirects=2,
        allowed_file_roots=["/srv/images"],
    )
    policy = args.fetch_policy()
    assert policy.allowed_networks == (ipaddress.ip_network("10.1.2.0/24"), ipaddress.ip_network("fd00::/8"))
    assert policy.max_redirects == 2 and policy.allowed_file_roots == ("/srv/images",)
    policy.check_address("10.1.2.3")
    assert AppArgs(model="tiny-random", fetch_allow_private=True).fetch_policy().allow_private is True


def test_object_store_allowed_is_empty_by_default_and_reaches_the_policy():
    """Issue 26: clients could name any bucket; now only what object_store_allowed lists."""
    assert AppArgs(model="tiny-random").fetch_policy().object_store_allowed == {}
    args = AppArgs.model_validate(
        {"model": "tiny-random", "object_store_allowed": '{"s3": ["photos/public", "shared"]}'}
    )  # the serve run command-line form
    assert args.fetch_policy().object_store_allowed == {"s3": ("photos/public", "shared")}


def test_the_replaced_object_store_protocols_arg_names_its_successor():
    """A config from before issue 26 fails the build saying what to write instead, not just 'extra field'."""
    with pytest.raises(ValidationError, match="object_store_protocols: replaced by object_store_allowed"):
        AppArgs(model="tiny-random", object_store_protocols=["s3"])


@pytest.mark.parametrize(
    "allowed",
    [
        {"https": ["x"]},
        {"zip": ["x"]},
        {"s3": []},
        {"s3": ["b/../c"]},
        {"s3": [""]},
        {f"p{i}": ["b"] for i in range(17)},  # more protocols than the bound
    ],
)
def test_bad_object_store_allow_lists_fail_the_build(allowed):
    with pytest.raises(ValidationError, match="object_store_allowed"):
        AppArgs(model="tiny-random", object_store_allowed=allowed)


@pytest.mark.parametrize("nets", [["10.0.0.0/33"], ["example.com"], ["10.0.0.1/8"]])
def test_bad_networks_are_refused(nets):
    with pytest.raises(ValidationError, match="fetch_allowed_networks"):
        AppArgs(model="tiny-random", fetch_allowed_networks=nets)


def test_the_graph_default_requests_fit_two_cores():
    """The README's demo command sets no resources: every deployment's default must be schedulable on a
    2-core machine at once (an unschedulable replica never starts and its routes would wait for it)."""
    from deployments.encoder import Encoder
    from deployments.importer import Importer
    from deployments.ingress import Ingress
    from deployments.library_index import LibraryIndex
    from deployments.writer import Writer

    graph = (Ingress, Encoder, LibraryIndex, Writer, Importer)
    requests = {d.name: d.ray_actor_options.get("num_cpus", 1) * (d.num_replicas or 1) for d in graph}
    assert sum(requests.values()) <= 2.0, requests
    assert all(d.ray_actor_options.get("num_gpus", 0) == 0 for d in graph)


def test_command_line_strings_become_lists_and_objects(tmp_path, monkeypatch):
    """``serve run ... key=value`` passes strings: lists take JSON or commas, objects take JSON."""
    monkeypatch.chdir(tmp_path)
    args = AppArgs.model_validate(
        {
            "import_roots": "./imports,/srv/more",
            "fetch_allowed_networks": '["10.0.0.0/8"]',
            "limits": '{"max_top_k": 100}',
            "index": '{"hnsw_min_rows": 5000}',
            "fetch_max_redirects": "3",
        }
    )
    assert args.import_roots == [str(tmp_path / "imports"), "/srv/more"]
    assert args.fetch_allowed_networks == [ipaddress.ip_network("10.0.0.0/8")]
    assert (args.limits.max_top_k, args.index.hnsw_min_rows, args.fetch_max_redirects) == (100, 5000, 3)
    with pytest.raises(ValidationError, match=r"limits: '\{\"max_top_k\"' is not valid JSON"):
        AppArgs.model_validate({"limits": '{"max_top_k"'})


def test_relative_paths_are_the_builders_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = AppArgs.model_validate({"storage_root": "./data", "allowed_file_roots": ["pics"]})
    assert args.storage_root == str(tmp_path / "data")
    assert args.allowed_file_roots == [str(tmp_path / "pics")]


def test_dedicated_shards_name_one_deployment_per_shard():
    args = AppArgs(
        dedicated_shards=[
            {"library": "photos", "shards": [0, 3], "deployment": {"max_replicas_per_node": 1}},
            {"library": "logos", "shards": [0]},
        ]
    )
    assert [e.deployment_names() for e in args.dedicated_shards] == [
        {0: "LibraryIndex-photos-0", 3: "LibraryIndex-photos-3"},
        {0: "LibraryIndex-logos-0"},
    ]
    # the command line passes it as JSON
    raw = AppArgs(dedicated_shards='[{"library": "photos", "shards": [2]}]')
    assert raw.dedicated_shards[0].shards == [2]


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([{"library": "photos", "shards": []}], "shards"),
        ([{"library": "photos", "shards": [64]}], "shard 64 is out of range"),
        ([{"library": "photos", "shards": [-1]}], "shard -1 is out of range"),
        ([{"library": "photos", "shards": [1, 1]}], "listed twice"),
        ([{"library": "photos", "shards": [1]}, {"library": "photos", "shards": [2, 1]}], "listed twice"),
        ([{"library": "photos", "shards": [16]}], "limits.max_shards = 16"),
        ([{"library": "bad name", "shards": [0]}], "library"),
        ([{"library": "photos", "shards": [0], "deployment": {"name": "x"}}], "is named LibraryIndex-"),
        ([{"library": "photos", "shards": [0], "replicas": 2}], "replicas"),
    ],
)
def test_bad_dedicated_shards_are_refused_naming_the_field(entries, message):
    with pytest.raises(ValidationError) as err:
        AppArgs(dedicated_shards=entries)
    assert message in str(err.value) and "dedicated_shards" in str(err.value)


def test_build_app_binds_a_deployment_per_dedicated_shard(tmp_path):
    from deployments.app import build_app

    app = build_app(
        {
            "model": "tiny-random",
            "storage_root": str(tmp_path),
            "dedicated_shards": [{"library": "photos", "shards": [0, 2], "deployment": {"num_replicas": 2}}],
            "deployment_options": {"LibraryIndex-photos-2": {"num_replicas": 3}},
        }
    )
    (*_, dedicated) = app._bound_deployment.init_args
    by_shard = {(lib, k): bound._bound_deployment for lib, k, bound in dedicated}
    assert sorted(by_shard) == [("photos", 0), ("photos", 2)]
    assert {k: d.name for (_, k), d in by_shard.items()} == {
        0: "LibraryIndex-photos-0",
        2: "LibraryIndex-photos-2",
    }
    assert [by_shard["photos", k].num_replicas for k in (0, 2)] == [2, 3]
    assert [by_shard["photos", k].init_args[-1] for k in (0, 2)] == [("photos", 0), ("photos", 2)]


def test_an_import_budget_that_cannot_hold_a_line_and_its_image_is_refused():
    """The Importer reads a line only with room for it and for the image it may fetch."""
    mib = 1024 * 1024
    with pytest.raises(ValidationError, match=r"max_task_bytes_in_flight .* plus limits.max_image_bytes"):
        AppArgs(
            limits={"max_image_bytes": 64 * mib},
            imports={"max_line_bytes": 8 * mib, "max_task_bytes_in_flight": 72 * mib},
        )
    AppArgs(
        limits={"max_image_bytes": 64 * mib},
        imports={"max_line_bytes": 8 * mib, "max_task_bytes_in_flight": 72 * mib + 3},
    )
