"""The HTTP face of `downstream.serve`: `python -m downstream serve INDEX_DIR [INDEX_DIR ...]` (FastAPI on uvicorn).

    GET  /                 the search page (downstream/serve_page.html: plain HTML + JS, nothing external)
    POST /search           multipart: file `image`, fields `k`, `label`; or JSON {"key" | "text": ..., "k", "label"}
                           -> {"index", "generation", "count", "query", "hits": [{rank, id, score, key, label,
                           label_name, caption, shard, source, thumbnail URL}]}
    GET  /item/{key}       the item's metadata row (its .json under "meta")
    GET  /thumb/{key}      its PNG thumbnail, from the metadata database
    GET  /info             the index's info.json, count, fingerprint, labels, generation
    GET  /healthz          every index's generation and count
    POST /reload           load the folder(s) again now (from this machine only)

Every endpoint but /healthz takes `?index=NAME` (an index folder's name; default the first one given).
Safe by default: binds 127.0.0.1; request bodies over 10 MiB and images over 16.8 megapixels are refused (413)
before they are decoded; keys are looked up in SQLite and nothing a request says names a file; every bad input
is a 4xx with a message ({"detail": ...}).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
from collections.abc import Sequence
from importlib import resources
from urllib.parse import quote

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from downstream.retrieval import RetrievalError
from downstream.serve import MAX_K, IndexService, Query, ServeError, Snapshot

MAX_UPLOAD_BYTES = 10 * 2**20
MAX_PIXELS = 4096 * 4096  # below Pillow's own decompression-bomb threshold (~89 Mpx), so it never warns first
LOOPBACK = ("127.0.0.1", "::1")
# The page loads nothing from elsewhere; the browser is told so too.
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' blob:; "
               "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
SEARCH_FIELDS = {"image", "key", "text", "k", "label"}


def decode_upload(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Uploaded bytes -> a loaded PIL image (first frame); `ServeError` for an empty file (400), a non-image
    (415) or more than `max_pixels` pixels (413), checked from the header before any pixel is decoded."""
    if not data:
        raise ServeError(400, "the uploaded image is empty")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ServeError(413, f"image refused as a decompression bomb: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ServeError(415, f"not an image this server can read: {e}") from None
    w, h = image.size
    if w * h > max_pixels:
        raise ServeError(413, f"image of {w}x{h} = {w * h:,} pixels; the limit is {max_pixels:,}")
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
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
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


def _int_field(name: str, value, *, required: bool = False) -> int | None:
    if value is None or value == "":
        if required:
            raise ServeError(400, f"{name} is required")
        return None
    if isinstance(value, bool):
        raise ServeError(400, f"{name} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ServeError(400, f"{name} must be an integer, got {value!r}")


def _thumb_url(key: str, index: str) -> str:
    return f"/thumb/{quote(key, safe='')}?index={quote(index, safe='')}"


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
    default = next(iter(services))
    page = resources.files("downstream").joinpath("serve_page.html").read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        for service in services.values():
            service.close()

    # No /docs or /redoc: FastAPI's versions load scripts from a CDN.
    app = FastAPI(title="vitssl retrieval", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=max_upload_bytes)
    app.state.services = services

    @app.exception_handler(ServeError)
    async def _serve_error(_request: Request, e: ServeError) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, e.status)

    @app.exception_handler(RetrievalError)
    async def _retrieval_error(_request: Request, e: RetrievalError) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, 400)

    def pick(index: str | None) -> IndexService:
        name = default if index is None else index
        if name not in services:
            raise ServeError(404, f"no index named {name!r}; this server has {', '.join(map(repr, services))}")
        return services[name]

    async def ask(snap: Snapshot, work):
        return await asyncio.wrap_future(snap.submit(work))

    async def read_query(request: Request) -> tuple[Query, dict]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            form = await request.form(max_files=1, max_fields=len(SEARCH_FIELDS))
            try:
                fields = dict(form)
                upload = fields.get("image")
                if not isinstance(upload, UploadFile):
                    raise ServeError(400, "a multipart search needs a file field 'image'")
                data = await upload.read()
                filename = upload.filename
            finally:
                await form.close()
            extra = set(fields) - {"image", "k", "label"}
            if extra:
                raise ServeError(400, f"unknown field(s) {sorted(extra)}; a multipart search takes image, k, label")
            k, label = _int_field("k", fields.get("k")), _int_field("label", fields.get("label"))
            image = await run_in_threadpool(decode_upload, data, max_pixels)  # off the event loop: up to 16.8 Mpx
            return Query(image=image, k=10 if k is None else k, label=label), {"kind": "image", "filename": filename}
        if ctype == "application/json":
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested deep
                raise ServeError(400, f"the body is not valid JSON: {e}") from None
            if not isinstance(body, dict):
                raise ServeError(400, "the JSON body must be an object: {\"key\": ...} or {\"text\": ...}")
            extra = set(body) - (SEARCH_FIELDS - {"image"})
            if extra:
                raise ServeError(400, f"unknown field(s) {sorted(extra)}; a JSON search takes key or text, k, label")
            for name in ("key", "text"):
                if name in body and not isinstance(body[name], str):
                    raise ServeError(400, f"{name} must be a string, got {body[name]!r}")
            k = body.get("k", 10)
            query = Query(key=body.get("key"), text=body.get("text"), k=k if isinstance(k, int) else
                          _int_field("k", k, required=True), label=_int_field("label", body.get("label")))
            return query, {"kind": query.kind, query.kind: body.get(query.kind)}
        raise ServeError(415, "send multipart/form-data with a file field 'image', or application/json with "
                              "a 'key' or a 'text'")

    @app.get("/", response_class=HTMLResponse)
    async def index_page() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY,
                                           "X-Content-Type-Options": "nosniff"})

    @app.post("/search")
    async def search(request: Request, index: str | None = None) -> JSONResponse:
        service = pick(index)
        query, echo = await read_query(request)
        with service.use() as snap:
            snap.check(query)
            answer = await ask(snap, query)
        for hit in answer["hits"]:
            hit["thumbnail"] = _thumb_url(hit["key"], service.name) if hit["thumbnail"] else None
        # a JSONResponse as is: FastAPI's generic encoding of the hits costs more than the search on small indexes
        return JSONResponse({"index": service.name, **answer, "query": {**echo, "k": query.k, "label": query.label}})

    def lookup(key: str, thumbnails: bool):
        def row(index):
            try:
                return index.rows_for([index.lookup_key(key)], thumbnails=thumbnails)[0]
            except KeyError as e:
                raise ServeError(404, e.args[0]) from None

        return row

    @app.get("/item/{key:path}")
    async def item(key: str, index: str | None = None) -> dict:
        service = pick(index)
        with service.use() as snap:
            row = await ask(snap, lookup(key, thumbnails=True))
            generation = snap.generation
        row["thumbnail"] = _thumb_url(key, service.name) if row["thumbnail"] is not None else None
        return {"index": service.name, "generation": generation, **row}

    @app.get("/thumb/{key:path}")
    async def thumb(key: str, index: str | None = None) -> Response:
        service = pick(index)
        with service.use() as snap:
            row = await ask(snap, lookup(key, thumbnails=True))
        if row["thumbnail"] is None:
            raise ServeError(404, f"no thumbnail stored for {key!r} (index built with --no-thumbnails)")
        return Response(row["thumbnail"], media_type="image/png", headers={"X-Content-Type-Options": "nosniff"})

    @app.get("/info")
    async def info(index: str | None = None) -> dict:
        service = pick(index)
        with service.use() as snap:
            return {**snap.describe(), "indexes": list(services), "default": default}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "indexes": {name: {"generation": s.snapshot.generation, "count": s.snapshot.count}
                                            for name, s in services.items()}}

    @app.post("/reload")
    async def reload(request: Request, index: str | None = None) -> dict:
        if request.client is None or request.client.host not in LOOPBACK:
            raise ServeError(403, "reload is only taken from this machine (loopback)")
        chosen = [pick(index)] if index is not None else list(services.values())
        out = {}
        for service in chosen:
            try:
                snap = await run_in_threadpool(service.reload, force=True)
            except (RetrievalError, OSError) as e:
                raise ServeError(409, f"index {service.name!r} could not be reloaded: {e}") from None
            out[service.name] = {"generation": snap.generation, "count": snap.count}
        return {"reloaded": out}

    return app


def serve(folders: Sequence[str | os.PathLike], *, host: str = "127.0.0.1", port: int = 8000,
          access_log: bool = True, **kwargs) -> None:
    """Load the folders and serve them until interrupted (uvicorn; `kwargs` go to `create_app`)."""
    app = create_app(folders, **kwargs)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=access_log, server_header=False)
