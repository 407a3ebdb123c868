"""The HTTP app: OpenAI-compatible routes over the continuous-batching engine, and the web chat page.

The app is asyncio; the engine runs in its own thread and hands events over with `call_soon_threadsafe`.
A request's rows are cancelled the moment its client goes away: a stream's generator is closed when
Starlette sees the disconnect, and a non-streaming request polls for it while it waits.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from pocketr1.engine.batcher import Batcher, Job, QueueFull
from pocketr1.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    Reply,
    chat_messages,
    error_body,
    sampling,
    sse,
)
from pocketr1.tokenizer import ChatTokenizer

WEB = Path(__file__).parent / "web"
PAGE_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
MAX_BODY = 1 << 20  # bytes; a chat request is rarely more than a few KiB
# h11 (uvicorn) bounds headers only while they are still arriving (16 KiB); a request whose headers arrive
# whole in one read passes that check, so their total size is bounded here too.
MAX_HEADERS = 32 << 10  # bytes, names and values together; browsers send 1-2 KiB
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streaming request checks its client is still there
# The page loads nothing from elsewhere and talks only to this server.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:", "Cache-Control": "no-cache"}


def create_app(engine: Batcher, tok: ChatTokenizer, model_id: str, api_key: str | None = None,
               keepalive_s: float = 10.0) -> FastAPI:
    app = FastAPI(title="pocket-r1", summary="OpenAI-compatible API for R1-style reasoning models",
                  docs_url=None, redoc_url=None)  # the docs pages load assets from a CDN
    app.add_middleware(Guard, api_key=api_key, max_body=MAX_BODY)
    context = engine.max_len
    _error_handlers(app)

    def check_model(name: str) -> None:
        if name != model_id:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{model_id}`.",
                           param="model", code="model_not_found")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_id, **engine.stats()}

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "pocketr1", "max_model_len": context}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        check_model(name)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request) -> Response:
        check_model(req.model)
        messages = chat_messages(req)
        try:  # in a worker thread: a long conversation must not stall the streams being served
            ids = await asyncio.to_thread(tok.chat_ids, messages)
        except Exception as e:  # the chat template refused the conversation (e.g. roles out of order)
            raise APIError(400, f"the chat template cannot render these messages ({e}).", param="messages") from None
        job = Job(ids, **sampling(req, len(ids), context, engine.max_batch, req.n))
        reply = Reply(True, model_id, req.n, len(ids), _include_usage(req))
        return await respond(request, [job], reply, req.stream)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        check_model(req.model)
        if req.echo:
            raise APIError(400, "echo is not supported by this server.", param="echo")
        prompts = req.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError(400, "prompt must not be empty.", param="prompt")
        ids = await asyncio.to_thread(lambda: [tok.encode(p) if isinstance(p, str) else list(p) for p in prompts])
        bos = tok.token_id(tok.bos_token) if tok.bos_token else None
        ids = [p or ([bos] if bos is not None else []) for p in ids]  # an empty prompt starts from BOS
        if any(not p or min(p) < 0 or max(p) >= tok.vocab_size for p in ids):
            raise APIError(400, f"each prompt needs at least one token, ids in [0, {tok.vocab_size}).", param="prompt")
        choices = len(ids) * req.n
        jobs = [Job(p, **sampling(req, len(p), context, engine.max_batch, choices, "prompt")) for p in ids]
        reply = Reply(False, model_id, choices, sum(len(p) for p in ids), _include_usage(req))
        return await respond(request, jobs, reply, req.stream)

    async def respond(request: Request, jobs: list[Job], reply: Reply, stream: bool) -> Response:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink_for(offset: int):
            def put(event: tuple) -> None:  # runs on the engine thread
                try:
                    loop.call_soon_threadsafe(events.put_nowait, (offset, event))
                except RuntimeError:  # the loop is gone (shutting down): nobody is listening
                    pass
            return put

        tickets = []

        def cancel_all() -> None:
            for ticket in tickets:
                engine.cancel(ticket)

        try:
            for i, job in enumerate(jobs):
                tickets.append(engine.submit(job, sink_for(i * job.n)))
        except QueueFull as e:
            cancel_all()
            raise APIError(429, f"The server is busy: {e} Retry shortly.", type="rate_limit_error",
                           code="queue_full") from None
        except ValueError as e:  # what validation let through but the engine cannot take
            cancel_all()
            raise APIError(400, str(e)) from None
        live = sum(job.n for job in jobs)

        def apply(offset: int, event: tuple) -> list[dict]:
            nonlocal live
            if event[0] == "error":
                raise APIError(500, event[1], type="server_error")
            if event[0] == "text":
                return reply.text(offset + event[1], event[2])
            live -= 1
            return reply.done(offset + event[1], event[2], event[3])

        if stream:
            async def body():
                try:
                    if opening := b"".join(sse(c) for c in reply.start()):
                        yield opening
                    while live:
                        try:
                            batch = [await asyncio.wait_for(events.get(), keepalive_s)]
                        except asyncio.TimeoutError:
                            yield b": keep-alive\n\n"  # proxies and clients keep a quiet stream open
                            continue
                        while not events.empty():  # behind by several tokens: one write for all of them
                            batch.append(events.get_nowait())
                        try:
                            out = [sse(c) for offset, event in batch for c in apply(offset, event)]
                        except APIError as e:
                            yield sse(e.body) + sse("[DONE]")
                            return
                        yield b"".join(out)
                    if reply.include_usage:
                        yield sse(reply.usage_chunk())
                    yield sse("[DONE]")
                finally:
                    cancel_all()

            # The background task also runs when the client left before the first chunk was produced.
            return StreamingResponse(body(), media_type="text/event-stream", background=BackgroundTask(cancel_all),
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            next_check = loop.time() + DISCONNECT_POLL_S
            while live:
                if loop.time() >= next_check:  # on a clock: events may arrive faster than any timeout
                    if await request.is_disconnected():
                        return Response(status_code=499)  # nobody reads it; the rows are freed below
                    next_check = loop.time() + DISCONNECT_POLL_S
                try:
                    apply(*await asyncio.wait_for(events.get(), DISCONNECT_POLL_S))
                except asyncio.TimeoutError:
                    continue
                while live and not events.empty():
                    apply(*events.get_nowait())
        finally:
            cancel_all()
        return JSONResponse(reply.whole())

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB / "index.html", media_type="text/html", headers=PAGE_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def page_file(name: str) -> FileResponse:
        if name not in PAGE_FILES:
            raise HTTPException(404)
        return FileResponse(WEB / name, media_type=PAGE_FILES[name], headers=PAGE_HEADERS)

    return app


def _include_usage(req) -> bool:
    return bool(req.stream and req.stream_options and req.stream_options.include_usage)


def _error_handlers(app: FastAPI) -> None:
    """Every failure answers in OpenAI's error shape; nothing a client sends yields a traceback."""

    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors() or [{"loc": (), "msg": "invalid request", "type": ""}]
        first = errors[0]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body("The body is not valid JSON."), status_code=400)
        if tuple(first.get("loc", ())) == ("body",):
            return JSONResponse(error_body("The body must be a JSON object, sent with Content-Type: "
                                           "application/json."), status_code=400)
        # Drop the framework's "body" root and pydantic's names for union members ("str", "list[str]").
        loc = [str(x) for x in first.get("loc", ()) if x != "body" and not (
            isinstance(x, str) and (x in ("str", "int", "float", "bool") or "[" in x or x[:1].isupper()))]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def crash(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)


class Guard:
    """ASGI middleware in front of every route: the API key, and a cap on the body size."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.max_body = app, max_body
        self.key = api_key.encode() if api_key else None

    def _authorized(self, header: bytes) -> bool:
        """`Bearer KEY` (API clients), or HTTP Basic with KEY as the password: what a browser sends for the
        page once its built-in login prompt was answered (the user name is not checked)."""
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"basic":
            try:
                token = base64.b64decode(token.strip(), validate=True).partition(b":")[2]
            except ValueError:
                return False
        elif scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(token.strip(), self.key)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADERS:
            response = JSONResponse(error_body(f"The request headers are over {MAX_HEADERS} bytes."), status_code=431)
            return await response(scope, receive, send)
        path = scope["path"]
        if self.key and path != "/health" and not self._authorized(dict(scope["headers"]).get(b"authorization", b"")):
            if path == "/" or path.startswith("/static/"):  # the page: the browser asks for the key itself
                response = Response("This server needs its API key: enter it as the password.", status_code=401,
                                    headers={"WWW-Authenticate": 'Basic realm="pocket-r1", charset="UTF-8"'})
            else:
                body = error_body("Incorrect or missing API key: send `Authorization: Bearer KEY`.",
                                  code="invalid_api_key")
                response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        # Read the body here, whole, up to the cap; the app then gets it in one message.
        too_big = JSONResponse(error_body(f"The body is over {self.max_body} bytes."), status_code=413)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body:
            return await too_big(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await too_big(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # later calls watch for the disconnect
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)
