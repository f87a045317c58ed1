"""`python -m downstream serve`: the HTTP API end to end through a real uvicorn socket, against what the in-process
`query_index` answers for the same queries; every bad input a 4xx with a message; `index add` under load."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import logging
import os
import re
import shutil
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from downstream.__main__ import main
from downstream.retrieval import RetrievalIndex
from downstream.search import build_index, query_index
from downstream.serve import IndexService, Query, ServeError
from downstream.serve_app import MAX_PIXELS, create_app, decode_upload
from pretrain.backbone import create_backbone, export_backbone
from pretrain.objectives.clip import CLIP, export_open_clip
from pretrain.recipe import CLIPConfig, ModelConfig
from shards.tar import iter_tar_samples, open_shard

TINY = ModelConfig(img_size=8, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
FIRST_HALF, SECOND_HALF = "shard-{000000..000001}.tar", "shard-{000002..000003}.tar"  # 899 + 898 digits
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


# ---- what the browser test shares ------------------------------------------------------------------------------


def tiny_backbone(folder: Path) -> Path:
    torch.manual_seed(0)
    return export_backbone(create_backbone(TINY), folder, mean=[0.3], std=[0.3])


def tiny_clip(folder: Path) -> Path:
    """An untrained CLIP on 8x8 gray images as an open_clip export: its text queries rank by meaningless but
    deterministic similarities, which is all an API test needs."""
    torch.manual_seed(0)
    model = CLIP(create_backbone(TINY), CLIPConfig(embed_dim=24, text_width=32, text_heads=2, text_layers=1,
                                                   text_context_length=16), captions="auto", class_names=DIGITS)
    return export_open_clip(model.eval(), folder)


def shard_sample(shards: Path, shard: str, out: Path) -> tuple[str, Path]:
    """The first sample of a shard: its key, and its PNG written to `out`."""
    with open_shard(str(shards / shard)) as f:
        key, files = next(iter_tar_samples(f))
    out.write_bytes(files["png"])
    return key, out


@contextlib.contextmanager
def running(app) -> Iterator[str]:
    """The app served by uvicorn on a free loopback port in a thread; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def hit_pairs(hits: list[dict]) -> list[tuple[str, float]]:
    return [(h["key"], round(h["score"], 4)) for h in hits]


# ---- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(_digits_shards_once, tmp_path_factory) -> dict:
    """Three index folders behind one server: `digits` (all 1,797), `clip` (a CLIP-space index of 450 digits) and
    `live` (the first 899, for the `index add` test). The session's digits shards are only read, never copied."""
    root = tmp_path_factory.mktemp("serve")
    shards = _digits_shards_once
    backbone = tiny_backbone(root / "backbone")
    build_index(backbone, str(shards), root / "digits")
    build_index(tiny_clip(root / "clip-export"), str(shards / "shard-000000.tar"), root / "clip", space="clip")
    build_index(backbone, f"{shards}/{FIRST_HALF}", root / "live")
    app = create_app([root / "digits", root / "clip", root / "live"], poll_s=0.05)
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield {"root": root, "shards": shards, "client": client, "url": url, "app": app}


@pytest.fixture(scope="module")
def query_png(served) -> tuple[str, Path]:
    return shard_sample(served["shards"], "shard-000000.tar", served["root"] / "query.png")


def search_image(client: httpx.Client, png: Path, index: str | None = None, **fields) -> httpx.Response:
    return client.post("/search", params={"index": index} if index else None,
                       files={"image": (png.name, png.read_bytes(), "image/png")},
                       data={k: str(v) for k, v in fields.items()})


# ---- answers ----------------------------------------------------------------------------------------------------


def test_image_search_finds_itself_first_and_equals_query_index(served, query_png):
    key, png = query_png
    r = search_image(served["client"], png, k=12)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["index"] == "digits" and body["count"] == 1797 and body["generation"] == 1
    assert body["query"] == {"kind": "image", "filename": "query.png", "k": 12, "label": None}
    hits = body["hits"]
    assert hits[0]["key"] == key and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    expected = query_index(served["root"] / "digits", images=[png], k=12).hits[0]
    assert hit_pairs(hits) == hit_pairs(expected)
    fields = ("rank", "id", "label", "label_name", "caption", "shard", "source")
    assert [{f: h[f] for f in fields} for h in hits] == [{f: h[f] for f in fields} for h in expected]
    assert hits[0]["thumbnail"] == f"/thumb/{key}?index=digits"


def test_key_search_leaves_the_key_out_and_equals_query_index(served, query_png):
    key, _ = query_png
    r = served["client"].post("/search", json={"key": key, "k": 7})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert key not in [h["key"] for h in hits] and len(hits) == 7
    assert hit_pairs(hits) == hit_pairs(query_index(served["root"] / "digits", keys=[key], k=7).hits[0])


def test_label_filter_is_the_top_k_of_that_label(served, query_png):
    key, png = query_png
    for label in (3, 8):
        r = search_image(served["client"], png, k=20, label=label)
        assert r.status_code == 200, r.text
        hits = r.json()["hits"]
        everything = query_index(served["root"] / "digits", images=[png], k=1797).hits[0]
        assert hit_pairs(hits) == hit_pairs([h for h in everything if h["label"] == label][:20])
        assert {h["label_name"] for h in hits} == {DIGITS[label]}
        by_key = served["client"].post("/search", json={"key": key, "k": 5, "label": label}).json()["hits"]
        assert len(by_key) == 5 and {h["label"] for h in by_key} == {label}


def test_text_query_on_a_clip_index_equals_query_index(served):
    r = served["client"].post("/search", params={"index": "clip"}, json={"text": "a handwritten digit seven", "k": 9})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["index"] == "clip" and body["count"] == 450 and body["query"]["kind"] == "text"
    expected = query_index(served["root"] / "clip", texts=["a handwritten digit seven"], k=9).hits[0]
    assert hit_pairs(body["hits"]) == hit_pairs(expected)


def test_item_thumb_info_healthz_and_page(served, query_png):
    key, _ = query_png
    client = served["client"]
    stored = RetrievalIndex.load(served["root"] / "digits").rows_for([0])[0]
    item = client.get(f"/item/{key}").json()
    assert item["key"] == key and item["label"] == stored["label"] and item["caption"] == stored["caption"]
    assert item["meta"] == stored["meta"] and item["thumbnail"] == f"/thumb/{key}?index=digits"
    thumb = client.get(f"/thumb/{key}")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    assert thumb.content == stored["thumbnail"]
    info = client.get("/info", params={"index": "clip"}).json()
    assert info["name"] == "clip" and info["count"] == 450 and info["text_queries"] and info["space"] == "clip"
    assert info["fingerprint"] == info["info"]["fingerprint"] and "sha256" not in info["info"]
    assert info["indexes"] == ["digits", "clip", "live"] and info["default"] == "digits"
    digits = client.get("/info").json()
    assert not digits["text_queries"] and [c["label_name"] for c in digits["labels"]] == DIGITS
    assert sum(c["count"] for c in digits["labels"]) == 1797
    health = client.get("/healthz").json()
    assert health["status"] == "ok"
    assert health["indexes"]["digits"] == {"generation": 1, "count": 1797, "status": "ok"}
    page = client.get("/")
    assert page.status_code == 200 and "<title>vitssl retrieval</title>" in page.text
    policy = page.headers["content-security-policy"]
    assert "://" not in page.text and "default-src 'none'" in policy
    # the page's own inline script and style run, by their hashes; nothing else inline does
    script = re.search(r"<script>(.*?)</script>", page.text, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}';" in policy and "unsafe-inline" not in policy
    assert client.get("/docs").status_code == 404  # FastAPI's docs page would load a CDN


def test_queries_waiting_together_are_embedded_in_one_batch_and_fail_alone(served, query_png):
    """While the worker is busy, queries queue up; the next batch embeds all its images in one call, an unknown key
    in it fails alone, and a query cancelled while it waited is skipped."""
    key, png = query_png
    service = IndexService(served["root"] / "digits", poll_s=0)
    try:
        with service.use() as snap:
            calls = []
            images = snap.embedder.images
            snap.embedder.images = lambda batch: calls.append(len(batch)) or images(batch)
            gate = threading.Event()
            snap.submit(lambda _index: gate.wait(10))  # holds the worker
            image = decode_upload(png.read_bytes())
            futures = [snap.submit(Query(image=image, k=3)) for _ in range(5)]
            futures += [snap.submit(Query(key="no-such-key")), snap.submit(Query(key=key, k=3))]
            gone = snap.submit(Query(key=key, k=3))
            assert gone.cancel()  # its client went away: skipped, and the worker goes on
            gate.set()
            answers = [f.result(30) if f.exception(30) is None else f.exception() for f in futures]
    finally:
        service.close()
    assert calls == [5]
    assert all(a["hits"][0]["key"] == key for a in answers[:5])
    assert isinstance(answers[5], ServeError) and answers[5].status == 404
    assert [h["key"] for h in answers[6]["hits"]] == [h["key"] for h in answers[0]["hits"]][1:] + [
        answers[6]["hits"][-1]["key"]]


# ---- bad input: a 4xx with a message, never a 500 ---------------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A valid PNG signature and header claiming width x height, with almost no pixel data (a bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def gray_png(size: int = 8) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("L", (size, size), 128).save(out, "PNG")
    return out.getvalue()


def upload(data: bytes, **fields) -> dict:
    return {"files": {"image": ("x.png", data, "image/png")}, "data": {k: str(v) for k, v in fields.items()}}


BAD = {
    "not an image": (upload(b"%PDF-1.4 not an image at all"), 415, "not an image"),
    "empty file": (upload(b""), 400, "empty"),
    "decompression bomb": (upload(png_header(50_000, 50_000)), 413, "decompression bomb"),
    "over the pixel cap": (upload(png_header(5000, 5000)), 413, "the limit is"),
    "truncated image": (upload(png_header(64, 64)), 415, "could not be decoded"),
    "unknown key": ({"json": {"key": "no-such-key"}}, 404, "no-such-key"),
    "unknown index": ({"params": {"index": "nope"}, "json": {"key": "00000000"}}, 404, "no index named 'nope'"),
    "k zero": ({"json": {"key": "00000000", "k": 0}}, 400, "k must be an integer from 1 to 100"),
    "k too large": ({"json": {"key": "00000000", "k": 101}}, 400, "k must be an integer from 1 to 100"),
    "k not a number": (upload(gray_png(), k="many"), 400, "k must be an integer"),
    "text on a backbone index": ({"json": {"text": "a seven"}}, 400, "not in a CLIP space"),
    "unknown label": ({"json": {"key": "00000000", "label": 42}}, 400, "no indexed item has label 42"),
    "bad json": ({"content": b"{\"key\": ", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    "json nested too deep": ({"content": b"[" * 100_000, "headers": {"content-type": "application/json"}}, 400,
                             "not valid JSON"),
    "text too long": ({"params": {"index": "clip"}, "json": {"text": "seven " * 1000}}, 400, "text must be a string of at most 1,000 characters"),
    "empty text": ({"params": {"index": "clip"}, "json": {"text": "  "}}, 400, "the text is empty"),
    "json not an object": ({"json": ["00000000"]}, 400, "must be an object"),
    "key and text": ({"json": {"key": "00000000", "text": "x"}}, 400, "exactly one"),
    "unknown field": ({"json": {"key": "00000000", "path": "/etc/passwd"}}, 400, "unknown field"),
    "no image field": ({"files": {"picture": ("x.png", b"x", "image/png")}}, 400, "file field 'image'"),
    "wrong content type": ({"content": b"key=1", "headers": {"content-type": "text/plain"}}, 415, "multipart"),
    "oversize upload": (upload(b"\0" * (10 * 2**20 + 1)), 413, "over the limit"),
    # typed, bounded integers: what str.isdigit() takes but int() refuses, and what int() takes but should not
    "k written --1": (upload(gray_png(), k="--1"), 400, "k must be an integer from 1 to 100, got '--1'"),
    "k a superscript two": (upload(gray_png(), k="²"), 400, "k must be an integer from 1 to 100, got '²'"),
    "k of 5,000 digits (form)": (upload(gray_png(), k="9" * 5000), 400, "k must be an integer from 1 to 100"),
    "label written --1": (upload(gray_png(), label="--1"), 400, "label must be an integer (a class id)"),
    "label of 5,000 digits (form)": (upload(gray_png(), label="7" * 5000), 400, "label must be an integer"),
    "k of 5,000 digits (JSON)": ({"content": b'{"key": "00000000", "k": ' + b"9" * 5000 + b"}",
                                  "headers": {"content-type": "application/json"}}, 400,
                                 "k must be an integer from 1 to 100, got a 5,000-digit number"),
    "label of 5,000 digits (JSON)": ({"content": b'{"key": "00000000", "label": -' + b"7" * 5000 + b"}",
                                      "headers": {"content-type": "application/json"}}, 400,
                                     "label must be an integer (a class id), got a 5,000-digit number"),
    "k a string (JSON)": ({"json": {"key": "00000000", "k": "5"}}, 400, "k must be an integer from 1 to 100"),
    "key a lone surrogate": ({"content": b'{"key": "\\ud800"}', "headers": {"content-type": "application/json"}},
                             400, "key is not valid Unicode"),
    # nothing a request says is ignored without a word
    "k in the query string": ({"params": {"k": 5}, **upload(gray_png())}, 400,
                              "unknown query parameter(s) ['k']: the query string takes index; k go(es) in the"),
    "index twice": ({"params": [("index", "digits"), ("index", "clip")], "json": {"key": "00000000"}}, 400,
                    "['index'] given more than once"),
    "k twice (JSON)": ({"content": b'{"key": "00000000", "k": 1, "k": 50}',
                        "headers": {"content-type": "application/json"}}, 400, "field 'k' is given twice"),
    "k twice (form)": ({"files": {"image": ("x.png", gray_png(), "image/png")}, "data": {"k": ["1", "50"]}}, 400,
                       "form field(s) ['k'] given more than once"),
    "unknown form field": (upload(gray_png(), path="/etc/passwd"), 400,
                           "unknown field(s) ['path']; a multipart search takes image, k, label"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_search_is_a_4xx_with_a_message(served, case):
    kwargs, status, message = BAD[case]
    r = served["client"].post("/search", **kwargs)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


def test_oversize_upload_without_a_length_is_refused_while_it_streams(served):
    def chunks():  # chunked transfer: no Content-Length to refuse it by
        for _ in range(12):
            yield b"\0" * 2**20

    r = served["client"].post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over the limit" in r.json()["detail"]


@pytest.mark.parametrize("path, status, message", [
    ("/item/no-such-key", 404, "no-such-key"),
    ("/thumb/no-such-key", 404, "no-such-key"),
    ("/thumb/..%2F..%2Fetc%2Fpasswd", 404, "../../etc/passwd"),  # a key, looked up in SQLite, never a path
    ("/info?index=nope", 404, "no index named"),
    ("/item/00000000?index=../digits", 404, "no index named"),
])
def test_bad_lookups_are_404(served, path, status, message):
    r = served["client"].get(path)
    assert r.status_code == status and message in r.json()["detail"]


def test_the_pixel_cap_refuses_before_pillow_would_warn_of_a_bomb():
    from PIL import Image

    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS > MAX_PIXELS
    with pytest.raises(ServeError, match="11x10 = 110 pixels; the limit is 100") as e:
        decode_upload(png_header(11, 10), max_pixels=100)
    assert e.value.status == 413


def test_reload_is_refused_to_a_client_off_this_machine(served):
    from starlette.testclient import TestClient

    r = TestClient(served["app"]).post("/reload")  # its client address is "testclient", not loopback
    assert r.status_code == 403 and "loopback" in r.json()["detail"]


@pytest.mark.parametrize("headers, message", [
    ({"Origin": "http://evil.example"}, "a request from 'http://evil.example'"),
    ({"Origin": "null"}, "a request from 'null'"),  # a sandboxed frame or a file:// page
    ({"Referer": "http://evil.example/page.html"}, "a request from 'http://evil.example/page.html'"),
    ({"Sec-Fetch-Site": "cross-site"}, "another site's page"),
    ({"Host": "evil.example"}, "not Host 'evil.example'"),  # DNS rebinding: evil.example resolving to 127.0.0.1
])
def test_reload_refuses_a_cross_site_request(served, headers, message):
    """A page on another site can make the browser POST to 127.0.0.1 (CSRF); loopback alone does not stop it."""
    client = served["client"]
    g = client.get("/healthz").json()["indexes"]["clip"]["generation"]
    r = client.post("/reload", params={"index": "clip"}, headers=headers)
    assert r.status_code == 403 and message in r.json()["detail"], r.text
    assert client.get("/healthz").json()["indexes"]["clip"]["generation"] == g
    own = client.post("/reload", params={"index": "clip"}, headers={"Origin": served["url"],
                                                                     "Sec-Fetch-Site": "same-origin"})
    assert own.status_code == 200 and own.json()["reloaded"]["clip"]["generation"] == g + 1


@pytest.mark.parametrize("method, path, message", [
    ("GET", "/info?index=digits&verbose=1", "unknown query parameter(s) ['verbose']: the query string takes index"),
    ("GET", "/item/00000000?thumbnails=0", "unknown query parameter(s) ['thumbnails']"),
    ("GET", "/healthz?index=digits", "unknown query parameter(s) ['index']: the query string takes nothing"),
    ("POST", "/reload?index=clip&all=1", "unknown query parameter(s) ['all']"),
])
def test_unknown_query_parameters_are_a_400_naming_them(served, method, path, message):
    r = served["client"].request(method, path)
    assert r.status_code == 400 and message in r.json()["detail"], r.text


def test_the_openapi_schema_describes_the_typed_search_bodies(served):
    schema = served["client"].get("/openapi.json").json()
    body = schema["paths"]["/search"]["post"]["requestBody"]["content"]
    as_json, as_form = body["application/json"]["schema"], body["multipart/form-data"]["schema"]
    assert set(as_json["properties"]) == {"key", "text", "k", "label"} and not as_json["additionalProperties"]
    assert as_json["properties"]["k"] | {"description": ""} == {"type": "integer", "minimum": 1, "maximum": 100,
                                                                "default": 10, "title": "K", "description": ""}
    assert as_form["required"] == ["image"] and as_form["properties"]["image"]["format"] == "binary"
    params = {p["name"]: p["in"] for p in schema["paths"]["/info"]["get"]["parameters"]}
    assert params == {"index": "query"}


def test_cli_serve_refuses_a_missing_folder_and_two_of_one_name(served, tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nope")]) == 1
    assert "no retrieval index folder" in capsys.readouterr().err
    twin = shutil.copytree(served["root"] / "digits", tmp_path / "elsewhere" / "digits")
    assert main(["serve", str(served["root"] / "digits"), str(twin)]) == 1
    assert "two index folders are named 'digits'" in capsys.readouterr().err


# ---- live updates -----------------------------------------------------------------------------------------------


def test_index_add_under_load_is_picked_up_atomically(served):
    """Clients query `live` while `index add` appends the second half of the digits: every answer is exactly the
    old index's or exactly the new one's, as its generation and count say, and none fails."""
    client, root, shards = served["client"], served["root"], served["shards"]
    new_key, png = shard_sample(shards, "shard-000002.tar", root / "new.png")  # only in the second half
    before = hit_pairs(query_index(root / "live", images=[png], k=10).hits[0])
    assert new_key not in dict(before)
    answers, errors, done = [], [], threading.Event()

    def hammer():
        with httpx.Client(base_url=served["url"], timeout=60) as c:
            while not done.is_set():
                r = search_image(c, png, index="live", k=10)
                (answers if r.status_code == 200 else errors).append(r.json() if r.status_code == 200 else r.text)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        assert main(["index", "add", str(root / "live"), f"{shards}/{SECOND_HALF}"]) == 0
        deadline = time.monotonic() + 20
        while client.get("/healthz").json()["indexes"]["live"]["count"] != 1797:
            assert time.monotonic() < deadline, "the new version was not picked up"
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        done.set()
        for t in threads:
            t.join()
    after = hit_pairs(query_index(root / "live", images=[png], k=10).hits[0])
    assert after[0] == (new_key, 1.0)
    assert not errors, errors[:3]
    generations = {}
    for a in answers:
        assert hit_pairs(a["hits"]) == (before if a["count"] == 899 else after), a
        generations.setdefault(a["generation"], set()).add(a["count"])
    assert generations[1] == {899} and all(counts == {1797} for g, counts in generations.items() if g > 1)
    assert len(generations) >= 2, "no query saw both versions"

    # An explicit reload loads the folder again: a new generation of the same items.
    g = client.get("/healthz").json()["indexes"]["live"]["generation"]
    r = client.post("/reload", params={"index": "live"})
    assert r.status_code == 200 and r.json()["reloaded"]["live"] == {"generation": g + 1, "count": 1797}
    assert hit_pairs(search_image(client, png, index="live", k=10).json()["hits"]) == after


def test_a_half_written_folder_keeps_the_old_version(served, tmp_path):
    """A folder that goes missing or turns corrupt is not loaded: the last good version goes on answering."""
    client, root = served["client"], served["root"]
    folder = root / "clip"
    saved = shutil.copytree(folder, tmp_path / "saved")
    g = client.get("/healthz").json()["indexes"]["clip"]["generation"]
    (folder / "index.faiss").write_bytes(b"garbage")
    time.sleep(0.3)  # several polls
    assert client.get("/healthz").json()["indexes"]["clip"]["generation"] == g
    r = client.post("/reload", params={"index": "clip"})
    assert r.status_code == 409 and "does not match the checksum" in r.json()["detail"]
    assert client.post("/search", params={"index": "clip"}, json={"text": "a seven", "k": 3}).status_code == 200
    shutil.rmtree(folder)
    os.replace(saved, folder)  # as `RetrievalIndex.save` does: the poll loads it again


def truncate_in_place(path: Path, keep: float) -> bytes:
    """Cut a file to a fraction of its size in place (same inode, as a full disk or a bad copy leaves it); its old
    bytes."""
    good = path.read_bytes()
    with open(path, "r+b") as f:
        f.truncate(int(len(good) * keep))
    return good


def wait_until(condition, what: str, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while not (got := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.02)
    return got


def test_files_damaged_in_place_under_load_never_reach_a_request(served, query_png, tmp_path):
    """Threads hammer a served index while its meta.sqlite, then its index.faiss, are truncated in place: every
    answer is a 200 with the same hits (the snapshot holds what it loaded, checksummed, in memory), /healthz says
    "degraded" and why, and putting the files back serves them again as a new generation."""
    key, png = query_png
    folder = shutil.copytree(served["root"] / "digits", tmp_path / "digits")
    with running(create_app([folder], poll_s=0.02)) as url, httpx.Client(base_url=url, timeout=60) as client:
        expected = hit_pairs(client.post("/search", json={"key": key, "k": 5}).json()["hits"])
        statuses, wrong, broken, done = [], [], [], threading.Event()

        def hammer(n: int):
            with httpx.Client(base_url=url, timeout=60) as c:
                while not done.is_set():
                    try:
                        r = (c.post("/search", json={"key": key, "k": 5}) if n % 3 == 0 else
                             search_image(c, png, k=5) if n % 3 == 1 else c.get(f"/thumb/{key}"))
                    except httpx.TransportError as e:  # a reset connection: what a crashing handler looks like
                        broken.append(repr(e))
                        continue
                    statuses.append(r.status_code)
                    if r.status_code == 200 and n % 3 == 0 and hit_pairs(r.json()["hits"]) != expected:
                        wrong.append(r.json())

        def health() -> dict:
            return client.get("/healthz").json()

        threads = [threading.Thread(target=hammer, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.2)
            good_meta = truncate_in_place(folder / "meta.sqlite", 0.4)
            h = wait_until(lambda: (h := health())["status"] == "degraded" and h, "healthz never said degraded")
            assert h["indexes"]["digits"]["status"] == "degraded" and h["indexes"]["digits"]["generation"] == 1
            assert "meta.sqlite does not match the checksum" in h["indexes"]["digits"]["problem"]
            time.sleep(0.3)
            good_index = truncate_in_place(folder / "index.faiss", 0.5)
            wait_until(lambda: "index.faiss" in health()["indexes"]["digits"].get("problem", ""),
                       "the second damage was not reported")
            time.sleep(0.3)
            (folder / "index.faiss").write_bytes(good_index)
            (folder / "meta.sqlite").write_bytes(good_meta)
            h = wait_until(lambda: (h := health())["status"] == "ok" and h, "the repaired folder was not loaded")
            assert h["indexes"]["digits"]["generation"] >= 2 and "problem" not in h["indexes"]["digits"]
            time.sleep(0.2)
        finally:
            done.set()
            for t in threads:
                t.join()
    assert not broken, broken[:3]
    assert len(statuses) > 30 and set(statuses) == {200}, sorted(set(statuses))
    assert not wrong, wrong[:1]


def test_a_bad_folder_is_logged_once_and_its_recovery_once(served, tmp_path, caplog):
    """The watcher polls every 20 ms; a folder that stays corrupt is one warning, not one per poll, and its repair
    one more."""
    caplog.set_level(logging.INFO, logger="downstream.serve")
    folder = shutil.copytree(served["root"] / "clip", tmp_path / "clip")
    service = IndexService(folder, poll_s=0.02)
    try:
        good = truncate_in_place(folder / "meta.sqlite", 0.5)
        wait_until(lambda: service.problem, "the damage was not noticed")
        time.sleep(0.4)  # some 20 polls
        assert service.snapshot.generation == 1 and "meta.sqlite does not match" in service.problem
        (folder / "meta.sqlite").write_bytes(good)
        wait_until(lambda: service.problem is None and service.snapshot.generation == 2, "no recovery")
        time.sleep(0.1)
    finally:
        service.close()
    said = [r.getMessage() for r in caplog.records if r.name == "downstream.serve"]
    assert sum("reload failed" in m for m in said) == 1, said
    assert sum("recovered, serving generation 2" in m for m in said) == 1, said
