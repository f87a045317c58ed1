"""The HTTP face of `downstream.serve`: `python -m downstream serve INDEX_DIR [INDEX_DIR ...]` (FastAPI on uvicorn).

    GET  /                 the search page (downstream/serve_page.html: plain HTML + JS, nothing external)
    POST /search           multipart: file `image`, fields `k`, `label`; or JSON {"key" | "text": ..., "k", "label"}
                           -> {"index", "generation", "count", "query", "hits": [{rank, id, score, key, label,
                           label_name, caption, shard, source, thumbnail URL}]}
    GET  /item/{key}       the item's metadata row (its .json under "meta")
    GET  /thumb/{key}      its PNG thumbnail, from the metadata database
    GET  /info             the index's info.json, count, fingerprint, labels, generation
    GET  /healthz          {"status": "ok" | "degraded", "indexes": {name: {generation, count, status[, problem]}}};
                           always 200 while the server answers: "degraded" (with the reason) when a folder on
                           disk could not be loaded and the last good version is still served; monitors read it
    POST /reload           load the folder(s) again now (from this machine only, and not from another site's page)

Every endpoint but /healthz takes `?index=NAME` (an index folder's name; default the first one given) and nothing
else in the query string. Requests are typed (`JSONSearch`, `FormSearch`; GET /openapi.json describes them).
Safe by default: binds 127.0.0.1; request bodies over 10 MiB, images over 16.8 megapixels (413) or thinner than 64:1 (422) are refused
before they are decoded; keys are looked up in SQLite and nothing a request says names a file; every bad input
is a 4xx with a message ({"detail": ...}) naming the field; the page runs only its own script (CSP hashes).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi import Query as QueryParam
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from downstream.retrieval import RetrievalError
from downstream.serve import MAX_K, MAX_TEXT, IndexService, Query, ServeError, Snapshot
from shards.bounds import ImageBoundsError, check_image_size

MAX_UPLOAD_BYTES = 10 * 2**20
MAX_PIXELS = 4096 * 4096  # below Pillow's own decompression-bomb threshold (~89 Mpx), so it never warns first
LOOPBACK = ("127.0.0.1", "::1")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
INT64 = 2**63 - 1  # labels are SQLite integers
# The page loads nothing from elsewhere and runs only its own inline script and style, named by their sha256
# (`page_policy`); the browser is told so.
PAGE_POLICY = ("default-src 'none'; script-src {script}; style-src {style}; img-src 'self' blob:; "
               "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
SEARCH_FIELDS = {"image", "key", "text", "k", "label"}


def decode_upload(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Uploaded bytes -> a loaded PIL image (first frame); `ServeError` for an empty file (400), a non-image
    (415), more than `max_pixels` pixels (413) or an aspect ratio over `shards.bounds.MAX_ASPECT` (422: the
    transform's resize of the shorter side would blow a thin image up), checked from the header before any pixel
    is decoded (`shards.bounds.check_image_size`)."""
    if not data:
        raise ServeError(400, "the uploaded image is empty")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ServeError(413, f"image refused as a decompression bomb: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ServeError(415, f"not an image this server can read: {e}") from None
    try:
        check_image_size(*image.size, max_pixels=max_pixels)
    except ImageBoundsError as e:
        raise ServeError(413 if e.limit == "pixels" else 422, str(e)) from None
    try:
        image.load()
    except Exception as e:  # truncated or corrupt pixel data: a malformed upload, not a server fault
        raise ServeError(415, f"the image could not be decoded: {e}") from None
    return image


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is refused with 413, by its Content-Length when it
    declares one, else as soon as that many bytes have arrived (nothing larger is ever held)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        # a length of more digits than any limit is refused before int() (which refuses over 4,300 digits)
        if declared is not None and (not declared.isdigit() or len(declared) > 15 or int(declared) > self.max_bytes):
            return await JSONResponse(self._refusal(), 413)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, self._refusal()["detail"])
            return message

        await self.app(scope, limited, send)

    def _refusal(self) -> dict:
        return {"detail": f"request body over the limit of {self.max_bytes:,} bytes"}


# ---- typed requests: the OpenAPI schema says what a request may hold, and each is checked against it ----------


class SearchOptions(BaseModel):
    """What every search may say besides its query."""

    model_config = ConfigDict(extra="forbid", strict=True)
    k: int = Field(10, ge=1, le=MAX_K, description="how many hits (1 to the server's max_k)")
    label: int | None = Field(None, ge=-INT64, le=INT64, description="only hits with this label")


class JSONSearch(SearchOptions):
    """POST /search as application/json: exactly one of `key` (an indexed item: its neighbours, itself left out)
    or `text` (a caption; CLIP-space indexes only)."""

    key: str | None = Field(None, min_length=1, description="an indexed item's key")
    text: str | None = Field(None, max_length=MAX_TEXT, description="a caption (CLIP-space indexes only)")


class FormSearch(SearchOptions):
    """POST /search as multipart/form-data: the query image as file `image`."""

    image: bytes = Field(description="the query image (PNG, JPEG, WebP, ...)", json_schema_extra={"format": "binary"})


class _Huge:
    """A JSON integer too long to be one (`json.loads(parse_int=...)`): kept as its length, never converted,
    so that a 5,000-digit `k` is a 400 naming the field rather than Python's int-conversion limit."""

    def __init__(self, text: str):
        self.digits = len(text.lstrip("-"))

    def __repr__(self) -> str:
        return f"a {self.digits:,}-digit number"


_INTEGER = re.compile(r"-?[0-9]{1,19}")  # ASCII digits only: str.isdigit() would take '²' and int() refuse it


def _json_int(text: str) -> int | _Huge:
    return int(text) if len(text) <= 20 else _Huge(text)


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict:
    seen = dict(pairs)
    if len(seen) != len(pairs):
        twice = next(k for n, (k, _) in enumerate(pairs) if k in dict(pairs[:n]))
        raise ServeError(400, f"field {twice!r} is given twice in the JSON body; give it once")
    return seen


def _form_int(name: str, value: str) -> int | str | None:
    """A form field's integer; the text itself (for the model to refuse, naming the field) when it is none."""
    if value == "":
        return None
    return int(value) if _INTEGER.fullmatch(value.strip()) else value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text):,} characters)"


RULES = {"k": "an integer from 1 to {max_k}", "label": "an integer (a class id)", "key": "a non-empty string",
         "text": f"a string of at most {MAX_TEXT:,} characters", "image": "a file"}


def _invalid(e: ValidationError, given: dict, what: str, max_k: int) -> ServeError:
    """The first problem of a request's fields as one 400 line that names the field and what it takes."""
    errors = e.errors(include_url=False)
    extra = sorted(str(err["loc"][0]) for err in errors if err["type"] == "extra_forbidden")
    if extra:
        takes = "key or text, k, label" if what == "JSON" else "image, k, label"
        return ServeError(400, f"unknown field(s) {extra}; a {what} search takes {takes}")
    name = str(errors[0]["loc"][0]) if errors[0]["loc"] else "body"
    if errors[0]["type"] == "string_unicode":  # JSON "\ud800": no SQLite key or tokenizer takes it
        return ServeError(400, f"{name} is not valid Unicode (it holds a lone surrogate)")
    rule = RULES.get(name, errors[0]["msg"]).format(max_k=max_k)
    return ServeError(400, f"{name} must be {rule}, got {_short(given.get(name))}")


def _unencodable(key: str) -> None:
    try:  # a path decoded to a lone surrogate cannot be a SQLite key
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise ServeError(400, "key is not valid Unicode (it holds a lone surrogate)") from None


def _thumb_url(key: str, index: str) -> str:
    return f"/thumb/{quote(key, safe='')}?index={quote(index, safe='')}"


def page_policy(page: str) -> str:
    """The page's Content-Security-Policy: its inline <script> and <style> allowed by their sha256, nothing else."""
    def sources(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'"
                        for b in bodies) or "'none'"

    return PAGE_POLICY.format(script=sources("script"), style=sources("style"))


# ---- the app's state and what every route depends on -----------------------------------------------------------


@dataclass
class Served:
    """What an app serves: its index services by name (the first is the default), the page and its policy, and
    the limits requests are held to."""

    services: dict[str, IndexService]
    page: str
    policy: str
    max_pixels: int
    max_k: int

    @property
    def default(self) -> str:
        return next(iter(self.services))

    def pick(self, index: str | None) -> IndexService:
        name = self.default if index is None else index
        if name not in self.services:
            raise ServeError(404, f"no index named {name!r}; this server has {', '.join(map(repr, self.services))}")
        return self.services[name]


def _served(request: Request) -> Served:
    return request.app.state.served


def _query_takes(*names: str):
    """A dependency: the query string holds only `names`, each once (a `?k=5` on POST /search would otherwise be
    ignored without a word: k goes in the body)."""
    def check(request: Request) -> None:
        given = [k for k, _ in request.query_params.multi_items()]
        unknown = sorted(set(given) - set(names))
        if unknown:
            where = (f"; {', '.join(n for n in unknown if n in SEARCH_FIELDS)} go(es) in the form or JSON body"
                     if set(unknown) & SEARCH_FIELDS else "")
            takes = ", ".join(names) or "nothing"
            raise ServeError(400, f"unknown query parameter(s) {unknown}: the query string takes {takes}{where}")
        twice = sorted({k for k in given if given.count(k) > 1})
        if twice:
            raise ServeError(400, f"query parameter(s) {twice} given more than once; give each once")
    return Depends(check)


IndexName = Annotated[str | None, QueryParam(description="an index folder's name (default: the first one served)")]
ServedDep = Annotated[Served, Depends(_served)]


async def _ask(snap: Snapshot, work):
    return await asyncio.wrap_future(snap.submit(work))


async def _read_form(request: Request, served: Served) -> tuple[Query, dict]:
    form = await request.form(max_files=1, max_fields=len(SEARCH_FIELDS))
    try:
        names = [name for name, _ in form.multi_items()]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ServeError(400, f"form field(s) {twice} given more than once; give each once")
        fields = dict(form)
        upload = fields.get("image")
        if not isinstance(upload, UploadFile):
            raise ServeError(400, "a multipart search needs a file field 'image'")
        data = await upload.read()
        filename = upload.filename
    finally:
        await form.close()
    given = {n: v if isinstance(v, UploadFile) else _form_int(n, v) for n, v in fields.items()}
    try:
        options = FormSearch.model_validate({**{n: v for n, v in given.items() if v is not None}, "image": b""})
    except ValidationError as e:
        raise _invalid(e, fields, "multipart", served.max_k) from None
    image = await run_in_threadpool(decode_upload, data, served.max_pixels)  # off the event loop: up to 16.8 Mpx
    return (Query(image=image, k=options.k, label=options.label),
            {"kind": "image", "filename": filename})


async def _read_json(request: Request, served: Served) -> tuple[Query, dict]:
    try:
        body = json.loads(await request.body(), parse_int=_json_int, object_pairs_hook=_no_repeats)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8; RecursionError: nested deep
        raise ServeError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ServeError(400, "the JSON body must be an object: {\"key\": ...} or {\"text\": ...}")
    try:
        search = JSONSearch.model_validate(body)
    except ValidationError as e:
        raise _invalid(e, body, "JSON", served.max_k) from None
    query = Query(key=search.key, text=search.text, k=search.k, label=search.label)
    return query, {"kind": query.kind, query.kind: body.get(query.kind)}


def _search_body(max_k: int) -> dict:
    """The OpenAPI requestBody of POST /search: the two typed forms it takes, k bounded by this app's max_k."""
    def schema(model: type[BaseModel]) -> dict:
        out = model.model_json_schema()
        out["properties"]["k"]["maximum"] = max_k
        return out

    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema(JSONSearch)},
        "multipart/form-data": {"schema": schema(FormSearch)}}}}


# ---- routes ----------------------------------------------------------------------------------------------------


async def index_page(served: ServedDep) -> HTMLResponse:
    return HTMLResponse(served.page, headers={"Content-Security-Policy": served.policy,
                                              "X-Content-Type-Options": "nosniff"})


async def search(request: Request, served: ServedDep, index: IndexName = None) -> JSONResponse:
    service = served.pick(index)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        query, echo = await _read_form(request, served)
    elif ctype == "application/json":
        query, echo = await _read_json(request, served)
    else:
        raise ServeError(415, "send multipart/form-data with a file field 'image', or application/json with "
                              "a 'key' or a 'text'")
    with service.use() as snap:
        snap.check(query)
        answer = await _ask(snap, query)
    for hit in answer["hits"]:
        hit["thumbnail"] = _thumb_url(hit["key"], service.name) if hit["thumbnail"] else None
    # a JSONResponse as is: FastAPI's generic encoding of the hits costs more than the search on small indexes
    return JSONResponse({"index": service.name, **answer, "query": {**echo, "k": query.k, "label": query.label}})


def _lookup(key: str, thumbnails: bool):
    def row(index):
        try:
            return index.rows_for([index.lookup_key(key)], thumbnails=thumbnails)[0]
        except KeyError as e:
            raise ServeError(404, e.args[0]) from None

    return row


async def item(key: str, served: ServedDep, index: IndexName = None) -> dict:
    service = served.pick(index)
    _unencodable(key)
    with service.use() as snap:
        row = await _ask(snap, _lookup(key, thumbnails=True))
        generation = snap.generation
    row["thumbnail"] = _thumb_url(key, service.name) if row["thumbnail"] is not None else None
    return {"index": service.name, "generation": generation, **row}


async def thumb(key: str, served: ServedDep, index: IndexName = None) -> Response:
    service = served.pick(index)
    _unencodable(key)
    with service.use() as snap:
        row = await _ask(snap, _lookup(key, thumbnails=True))
    if row["thumbnail"] is None:
        raise ServeError(404, f"no thumbnail stored for {key!r} (index built with --no-thumbnails)")
    return Response(row["thumbnail"], media_type="image/png", headers={"X-Content-Type-Options": "nosniff"})


async def info(served: ServedDep, index: IndexName = None) -> dict:
    service = served.pick(index)
    with service.use() as snap:
        return {**snap.describe(), "indexes": list(served.services), "default": served.default}


async def healthz(served: ServedDep) -> dict:
    """200 whenever the server answers; "degraded", with each index's `problem`, while a folder on disk could not
    be loaded (the last good version answers meanwhile)."""
    indexes = {}
    for name, s in served.services.items():
        problem = s.problem
        indexes[name] = {"generation": s.snapshot.generation, "count": s.snapshot.count,
                         "status": "ok" if problem is None else "degraded",
                         **({"problem": problem} if problem is not None else {})}
    degraded = any(i["status"] != "ok" for i in indexes.values())
    return {"status": "degraded" if degraded else "ok", "indexes": indexes}


def _same_site(request: Request) -> None:
    """CSRF guard: a browser's cross-site POST carries an Origin (or Referer) that is not this server, and a DNS
    rebinding attack a Host that is not a loopback name; scripts and curl send neither header."""
    host = request.headers.get("host", "")
    if urlsplit(f"//{host}").hostname not in LOOPBACK_NAMES:
        raise ServeError(403, f"reload takes requests to this machine by a loopback name (127.0.0.1, localhost, "
                              f"[::1]), not Host {host!r}")
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        raise ServeError(403, "reload refused: the request came from another site's page")
    source = request.headers.get("origin") or request.headers.get("referer")
    if source is not None and urlsplit(source).netloc.lower() != host.lower():
        raise ServeError(403, f"reload refused: a request from {source!r}, not from this server's own page")


async def reload(request: Request, served: ServedDep, index: IndexName = None) -> dict:
    if request.client is None or request.client.host not in LOOPBACK:
        raise ServeError(403, "reload is only taken from this machine (loopback)")
    _same_site(request)
    chosen = [served.pick(index)] if index is not None else list(served.services.values())
    out = {}
    for service in chosen:
        try:
            snap = await run_in_threadpool(service.reload, force=True)
        except (RetrievalError, OSError) as e:
            raise ServeError(409, f"index {service.name!r} could not be reloaded: {e}") from None
        out[service.name] = {"generation": snap.generation, "count": snap.count}
    return {"reloaded": out}


async def _serve_error(_request: Request, e: ServeError) -> JSONResponse:
    return JSONResponse({"detail": str(e)}, e.status)


async def _retrieval_error(_request: Request, e: RetrievalError) -> JSONResponse:
    return JSONResponse({"detail": str(e)}, 400)


ERRORS = {"4XX": {"description": "a bad request: {\"detail\": \"...\"} says why, naming the field"}}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, with `?index=` naming the indexes this app serves (so that a client, or a fuzzer, can
    pick a real one)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        names = list(app.state.served.services)
        for operation in (op for path in schema["paths"].values() for op in path.values()):
            for param in operation.get("parameters", []):
                if param["name"] == "index" and param["in"] == "query":
                    param["schema"] = {"type": "string", "enum": names, "title": "Index"}
        app.openapi_schema = schema
    return app.openapi_schema


def _routes(app: FastAPI, max_k: int) -> None:
    with_index = [_query_takes("index")]
    app.add_api_route("/", index_page, methods=["GET"], response_class=HTMLResponse, dependencies=with_index,
                      include_in_schema=False)  # the page reads ?index= itself
    app.add_api_route("/search", search, methods=["POST"], dependencies=with_index, responses=ERRORS,
                      openapi_extra=_search_body(max_k))
    app.add_api_route("/item/{key:path}", item, methods=["GET"], dependencies=with_index, responses=ERRORS)
    app.add_api_route("/thumb/{key:path}", thumb, methods=["GET"], dependencies=with_index, responses=ERRORS,
                      response_class=Response)
    app.add_api_route("/info", info, methods=["GET"], dependencies=with_index, responses=ERRORS)
    app.add_api_route("/healthz", healthz, methods=["GET"], dependencies=[_query_takes()], responses=ERRORS)
    app.add_api_route("/reload", reload, methods=["POST"], dependencies=with_index, responses=ERRORS)


def create_app(
    folders: Sequence[str | os.PathLike],
    *,
    checkpoint: str | os.PathLike | None = None,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_pixels: int = MAX_PIXELS,
    max_k: int = MAX_K,
    poll_s: float = 1.0,
) -> FastAPI:
    """The app serving these index folders (loaded now: a bad folder raises here, before any socket opens).
    `poll_s`: how often each folder is checked for a new version (0: only on POST /reload)."""
    if not folders:
        raise ValueError("serve needs at least one index folder")
    if not 1 <= max_k <= MAX_K:
        raise ValueError(f"max_k={max_k}: give 1 to {MAX_K}")
    services: dict[str, IndexService] = {}
    try:
        for folder in folders:
            service = IndexService(folder, checkpoint=checkpoint, poll_s=poll_s, max_k=max_k)
            if service.name in services:
                service.close()
                raise ValueError(f"two index folders are named {service.name!r}: the name is how a request "
                                 "picks one (?index=NAME), give folders distinct names")
            services[service.name] = service
    except BaseException:
        for service in services.values():
            service.close()
        raise
    page = resources.files("downstream").joinpath("serve_page.html").read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        for service in services.values():
            service.close()

    # No /docs or /redoc: FastAPI's versions load scripts from a CDN. /openapi.json stays: it describes the API.
    app = FastAPI(title="vitssl retrieval", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=max_upload_bytes)
    app.state.served = Served(services, page, page_policy(page), max_pixels, max_k)
    app.state.services = services
    app.add_exception_handler(ServeError, _serve_error)
    app.add_exception_handler(RetrievalError, _retrieval_error)
    _routes(app, max_k)
    app.openapi = functools.partial(_openapi, app)
    return app


def serve(folders: Sequence[str | os.PathLike], *, host: str = "127.0.0.1", port: int = 8000,
          access_log: bool = True, **kwargs) -> None:
    """Load the folders and serve them until interrupted (uvicorn; `kwargs` go to `create_app`)."""
    app = create_app(folders, **kwargs)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=access_log, server_header=False)
