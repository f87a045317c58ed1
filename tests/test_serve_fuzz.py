"""Schema-driven fuzzing of the retrieval service with schemathesis: every operation of its OpenAPI schema
(GET /openapi.json, which describes the typed search bodies, the path keys and the query parameters), with inputs
that fit the schema and inputs that break it, sent over HTTP to the real uvicorn server on loopback. No input may
get a 5xx or a dropped connection. The budget is fixed and derandomized: a few seconds in all.

Schemathesis's own pytest loader (`schemathesis.pytest.from_fixture`) fails under pytest 9 (it reads the removed
`Node._nodeid`), so its per-operation strategies (`APIOperation.as_strategy`) run under hypothesis's `@given`."""

from __future__ import annotations

import collections

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from test_serve import running, tiny_backbone, tiny_clip

from downstream.search import build_index
from downstream.serve_app import create_app

EXAMPLES = 25  # per operation and generation mode
OPERATIONS = [("POST", "/search"), ("GET", "/item/{key}"), ("GET", "/thumb/{key}"), ("GET", "/info"),
              ("GET", "/healthz"), ("POST", "/reload")]


@pytest.fixture(scope="module")
def site(_digits_shards_once, tmp_path_factory) -> str:
    """A backbone index and a CLIP-space index (text queries reach the tokenizer), 450 digits each."""
    root = tmp_path_factory.mktemp("fuzz")
    shards = _digits_shards_once
    build_index(tiny_backbone(root / "backbone"), str(shards / "shard-000000.tar"), root / "digits")
    build_index(tiny_clip(root / "clip-export"), str(shards / "shard-000001.tar"), root / "clip", space="clip")
    with running(create_app([root / "digits", root / "clip"], poll_s=0)) as url:
        yield url


@pytest.fixture(scope="module")
def api(site):
    return schemathesis.openapi.from_url(f"{site}/openapi.json")


def test_every_route_is_in_the_schema_and_fuzzed(api):
    ops = [result.ok() for result in api.get_all_operations()]
    assert sorted((op.method.upper(), op.path) for op in ops) == sorted(OPERATIONS)


@pytest.mark.parametrize("method, path, mode", [
    (method, path, mode) for method, path in OPERATIONS for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if (path, mode) != ("/healthz", GenerationMode.NEGATIVE)  # it takes nothing: no input breaks its schema
], ids=lambda x: str(x).strip("/"))
def test_no_input_is_a_server_error(api, site, method, path, mode):
    operation = api[path][method]
    seen = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(case):
        try:
            response = case.call(base_url=site, timeout=60)
        except Exception as e:  # a reset or dropped connection: what a crashing handler looks like
            pytest.fail(f"{case.as_curl_command()} -> {e!r}")
        seen.append(response.status_code)
        assert response.status_code < 500, (f"{case.as_curl_command()} -> {response.status_code}: "
                                            f"{response.text[:300]}")

    fuzz()
    assert httpx.get(f"{site}/healthz").status_code == 200
    if mode == GenerationMode.POSITIVE and path not in ("/item/{key}", "/thumb/{key}"):  # random keys: 404
        # the schema names real indexes and typed bodies, so the fuzzer gets past the door into real searches
        assert 200 in seen, sorted(collections.Counter(seen).items())
