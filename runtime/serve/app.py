"""`gptedge serve`'s ASGI app: OpenAI's HTTP API over loaded bundles, one continuous batcher per model.

Requests are read (size- and time-capped), checked by `api.check_request`, and their sequences handed
to the model's `Batcher`, whose thread calls back with each step; the callbacks hop onto the event
loop (`call_soon_threadsafe`) and feed either a Server-Sent Events stream or one JSON answer. A
client that goes away cancels its sequences, and their KV rows are free by the batcher's next step.
The event loop does no model work, so onnxruntime's threads have the cores to themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, NamedTuple

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from gptedge.errors import ContextLengthError, GptEdgeError, UsageError
from gptedge.runtime.batcher import DEFAULT_KV_BUDGET_MB, Batcher, QueueFull
from gptedge.runtime.decoding import Decoding, GenerationResult, Step
from gptedge.runtime.model import DEFAULT_PREFIX_CACHE_MB
from gptedge.runtime.serve import api, endpoints
from gptedge.runtime.serve.endpoints import Metrics
from gptedge.runtime.tokens import token_bytes

log = logging.getLogger("gptedge.serve")
STATIC = Path(__file__).with_name("static")


@dataclass
class ServeConfig:
    """Everything `gptedge serve` was asked for (see its --help for the reasons behind the defaults)."""

    bundles: list[tuple[str, Path]]
    provider: str = "auto"
    threads: int | None = None
    spin: bool | None = None  # onnxruntime thread spinning (Model.load's spin)
    parallel: int = 4
    kv_budget_mb: float = DEFAULT_KV_BUDGET_MB
    cache_ram_mb: float = DEFAULT_PREFIX_CACHE_MB  # stored prompt prefixes per model (Model.load's prefix_cache_mb)
    prompt_cache_dir: Path | None = None  # NAME.npz per model: stored prompts read at start, written at shutdown
    max_queue: int = 64
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    max_body_bytes: int = 2 * 2**20
    body_timeout_s: float = 30.0


class ServedModel:
    """One model the server answers for: its Model, batcher, chat template and (on first use) grammar factory."""

    def __init__(self, name: str, model, batcher: Batcher | None) -> None:
        from gptedge.runtime.chat import template_for

        self.name, self.model, self.batcher = name, model, batcher  # batcher None: an embedding model
        self.capacity = batcher.capacity if batcher is not None else model.context_length
        self.template = template_for(model) if batcher is not None else None
        self._grammar = None
        self._lock = threading.Lock()

    @property
    def capabilities(self) -> list[str]:
        return ["completion", "chat"] if self.batcher is not None else ["embedding"]

    def kv_bytes_in_use(self) -> int:
        return self.batcher.kv_positions * self.model.engine.bytes_per_position if self.batcher is not None else 0

    def grammar(self):
        from gptedge.runtime.structured import GrammarFactory

        with self._lock:
            if self._grammar is None:
                self._grammar = GrammarFactory(self.model.tokenizer, self.model.stop_ids)
            return self._grammar

    def token_text(self, token: int) -> str:
        return self.model.decode([token], skip_special_tokens=False)


class ServerState:
    """The app's models, filled by a loading thread; /health answers 503 until it is done."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.models: dict[str, ServedModel] = {}
        self.ready = threading.Event()
        self.error: str | None = None

    def load(self) -> None:
        from gptedge.runtime import Model

        try:
            for name, path in self.config.bundles:
                model = Model.load(path, provider=self.config.provider, threads=self.config.threads,
                                   spin=self.config.spin, prefix_cache_mb=self.config.cache_ram_mb)
                if not isinstance(model, Model):  # an embedding bundle: vectors, no batcher
                    self.models[name] = ServedModel(name, model, None)
                    log.info("gptedge serve: %s loaded (embeddings, %s)", name, model.provider)
                    continue
                batcher = Batcher(model.engine, rows=self.config.parallel, kv_budget_mb=self.config.kv_budget_mb,
                                  max_queue=self.config.max_queue, pad_id=model.pad_id, name=f"gptedge-batcher-{name}",
                                  store=model.prefix_store)
                self.models[name] = ServedModel(name, model, batcher)
                saved = self._prompt_cache(name)
                if saved is not None and saved.is_file() and model.prefix_store is not None:
                    try:
                        log.info("gptedge serve: %s: %d stored prompts read from %s", name,
                                 model.load_prompt_cache(saved), saved)
                    except UsageError as exc:  # only a cache: serve without it, and overwrite it at shutdown
                        log.warning("gptedge serve: %s: prompt cache not used: %s", name, exc)
                log.info("gptedge serve: %s loaded (%s, %d rows of %d positions)", name, model.provider,
                         batcher.rows, batcher.capacity)
        except GptEdgeError as exc:
            self.error = f"{exc}"
        self.ready.set()

    def close(self) -> None:
        for name, served in self.models.items():
            if served.batcher is None:
                continue
            served.batcher.close()
            saved = self._prompt_cache(name)
            if saved is not None and served.model.prefix_store is not None:
                try:
                    saved.parent.mkdir(parents=True, exist_ok=True)
                    log.info("gptedge serve: %s: %d stored prompts written to %s", name,
                             served.model.save_prompt_cache(saved), saved)
                except OSError as exc:
                    log.warning("gptedge serve: the prompt cache of %s could not be written: %s", name, exc)

    def _prompt_cache(self, name: str) -> Path | None:
        folder = self.config.prompt_cache_dir
        return None if folder is None else folder / f"{name}.npz"


# -- plumbing ----------------------------------------------------------------------------------------------
def error_response(exc: api.ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def _check_key(request: Request, key: str | None) -> None:
    if key is None:
        return
    given = request.headers.get("authorization", "")
    token = given[7:] if given[:7].lower() == "bearer " else ""
    if not hmac.compare_digest(token.encode(), key.encode()):
        raise api.ApiError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'", "invalid_request_error",
                           None, "invalid_api_key")


async def _read_json(request: Request, limit: int, timeout: float) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise api.ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise api.ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        raw = await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise api.ApiError(408, f"the request body did not arrive within {timeout:g} s",
                           code="request_timeout") from None
    try:
        return api.check_depth(json.loads(raw))
    except RecursionError:  # nested past the parser's own limit: certainly past ours
        raise api.too_deep() from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise api.bad(f"the request body is not valid JSON ({exc})") from None


def _served(state: ServerState, name: Any) -> ServedModel:
    if not state.ready.is_set() or state.error:
        raise api.ApiError(503, "the models are still loading; retry when GET /health answers 200", "server_error",
                           code="loading")
    if name is not None and not isinstance(name, str):
        raise api.bad(f"'model' must be a string naming a served model, got {type(name).__name__}", "model")
    if name is None and len(state.models) == 1:
        return next(iter(state.models.values()))
    if name not in state.models:
        raise api.ApiError(404, f"model {name!r} is not served here; GET /v1/models lists {', '.join(state.models)}",
                           param="model", code="model_not_found")
    return state.models[name]


# -- generation --------------------------------------------------------------------------------------------
class SequenceEvent(NamedTuple):
    """What the batcher's thread reports for one choice: a step it took, or (`step` None) the end of it."""

    index: int  # the choice's index in the response
    step: Step | None = None
    result: GenerationResult | None = None  # the end: the result, or None with `error`
    error: BaseException | None = None

    @property
    def ended(self) -> bool:
        return self.step is None


class RequestRun:
    """A checked request's sequences in the batcher, their events on an asyncio queue."""

    def __init__(self, spec: api.RequestSpec, served: ServedModel, start: float,
                 metrics: Metrics | None = None) -> None:
        self.spec, self.served, self.metrics = spec, served, metrics
        self.queue: asyncio.Queue[SequenceEvent] = asyncio.Queue()
        self.handles = []
        loop = asyncio.get_running_loop()
        try:
            for c in spec.choices:
                seq = Decoding(served.model.tokenizer, c.prompt_ids, c.params, length_reason=c.length_reason,
                               logprobs=spec.logprobs, constraint=c.constraint() if c.constraint else None, start=start)
                self.handles.append(served.batcher.submit(
                    seq,
                    lambda step, i=c.index: loop.call_soon_threadsafe(self.queue.put_nowait,
                                                                      SequenceEvent(i, step=step)),
                    lambda result, error, i=c.index: self._done(loop, i, result, error),
                    cache_prompt=spec.cache_prompt,
                ))
        except QueueFull as exc:
            self.cancel()
            raise api.ApiError(503, f"the server is busy: {exc}", "server_error", code="queue_full") from None
        except ContextLengthError as exc:  # the sequence cannot fit a row of this server's KV budget
            self.cancel()
            raise api.bad(str(exc), None, "context_length_exceeded") from None

    def _done(self, loop: asyncio.AbstractEventLoop, index: int, result: GenerationResult | None,
              error: BaseException | None) -> None:
        if result is not None and self.metrics is not None:
            self.metrics.sequence(self.served.name, result)
        loop.call_soon_threadsafe(self.queue.put_nowait, SequenceEvent(index, result=result, error=error))

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()

    async def events(self) -> AsyncIterator[SequenceEvent]:
        left = len(self.handles)
        while left:
            event = await self.queue.get()
            if event.ended:
                left -= 1
            yield event


async def _watch_disconnect(request: Request, run: RequestRun) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            run.cancel()
            return


def _logprobs(run: RequestRun, entries, offset: int = 0) -> dict[str, Any]:
    s = run.served
    return api.logprobs_object(run.spec.kind, entries, s.token_text,
                               lambda t, text: token_bytes(s.model.tokenizer, t, text), offset)


async def _answer(request: Request, run: RequestRun) -> JSONResponse:
    watcher = asyncio.create_task(_watch_disconnect(request, run))
    results: dict[int, GenerationResult] = {}
    try:
        async for event in run.events():
            if event.error is not None:
                raise api.ApiError(500, f"generation failed: {event.error}", "server_error")
            if event.result is not None:
                results[event.index] = event.result
    finally:
        watcher.cancel()
    spec = run.spec
    choices = []
    for index in sorted(results):
        r = results[index]
        choice: dict[str, Any] = {"index": index, "finish_reason": api.finish_reason(r),
                                  "logprobs": _logprobs(run, r.logprobs) if spec.logprobs is not None else None}
        if spec.kind == "chat":
            choice["message"], called = api.assistant_message(spec, r.text)
            if called:
                choice["finish_reason"] = "tool_calls"
        else:
            choice["text"] = r.text
        choices.append(choice)
    completion = sum(len(r.token_ids) for r in results.values())
    return JSONResponse(api.envelope(spec, run.served.name, choices,
                                     usage=api.usage(spec.prompt_tokens, completion)))


def _stream(request: Request, run: RequestRun) -> StreamingResponse:
    spec = run.spec

    def chunk(index: int | None, text: str | None, finish: str | None, logprobs=None, first: bool = False,
              delta: dict[str, Any] | None = None) -> str:
        choices = []
        if index is not None:
            c: dict[str, Any] = {"index": index, "logprobs": logprobs, "finish_reason": finish}
            if spec.kind == "chat":
                c["delta"] = delta if delta is not None else ({"role": "assistant", "content": ""} if first
                                                              else {} if text is None else {"content": text})
            else:
                c["text"] = text or ""
            choices.append(c)
        body = api.envelope(spec, run.served.name, choices, chunk=True)
        if spec.include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"

    async def body() -> AsyncIterator[str]:
        watcher = asyncio.create_task(_watch_disconnect(request, run))
        sent: dict[int, str] = {c.index: "" for c in spec.choices}
        offsets: dict[int, int] = dict.fromkeys(sent, 0)
        completion = 0
        try:
            if spec.kind == "chat":
                for index in sent:
                    yield chunk(index, None, None, first=True)
            async for event in run.events():
                index, step, result = event.index, event.step, event.result
                if event.error is not None:
                    err = api.ApiError(500, f"generation failed: {event.error}", "server_error")
                    yield f"data: {json.dumps(err.body())}\n\n"
                    return
                if step is not None and spec.tools is not None:
                    continue  # an answer that may be a call is sent whole, as calls or as text, when it ends
                if step is not None:
                    lp = None
                    if spec.logprobs is not None and step.logprob is not None:
                        lp = _logprobs(run, [step.logprob], offsets[index])
                        offsets[index] += len(run.served.token_text(step.token))
                    if step.text or lp is not None:
                        sent[index] += step.text
                        yield chunk(index, step.text, None, lp)
                    continue
                completion += len(result.token_ids)
                if spec.tools is not None:
                    for piece in _tool_chunks(chunk, index, spec, result):
                        yield piece
                    continue
                tail = result.text[len(sent[index]):]
                yield chunk(index, tail if spec.kind != "chat" or tail else None, api.finish_reason(result))
            if spec.include_usage:
                final = api.envelope(spec, run.served.name, [], chunk=True,
                                     usage=api.usage(spec.prompt_tokens, completion))
                yield f"data: {json.dumps(final)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            run.cancel()  # a no-op for finished sequences; frees the rows of a client that went away

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _tool_chunks(chunk, index: int, spec: api.RequestSpec, result: GenerationResult) -> list[str]:
    """A finished answer of a request with tools, as OpenAI streams it: each call's index, id, type and name
    first, then its arguments' text, then finish_reason "tool_calls"; or the text, when it makes no call."""
    message, called = api.assistant_message(spec, result.text)
    if not called:
        return [chunk(index, result.text or None, api.finish_reason(result))]
    out = []
    for i, call in enumerate(message["tool_calls"]):
        head = {"index": i, "id": call["id"], "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""}}
        out.append(chunk(index, None, None, delta={"tool_calls": [head]}))
        out.append(chunk(index, None, None, delta={"tool_calls": [
            {"index": i, "function": {"arguments": call["function"]["arguments"]}}]}))
    out.append(chunk(index, None, "tool_calls"))
    return out


# -- routes ------------------------------------------------------------------------------------------------
def create_app(config: ServeConfig, state: ServerState | None = None) -> Starlette:
    """The ASGI app. Models load in a background thread started with the app (see ServerState)."""
    state = state or ServerState(config)

    async def generate(request: Request, kind: str) -> Response:
        start = time.perf_counter()
        try:
            _check_key(request, config.api_key)
            body = await _read_json(request, config.max_body_bytes, config.body_timeout_s)
            served = _served(state, body.get("model") if isinstance(body, dict) else None)
            if served.batcher is None:
                raise api.bad(f"model {served.name!r} is an embedding model; use POST /v1/embeddings", "model")
            spec = await asyncio.to_thread(api.check_request, kind, body, served)  # tokenizing, grammar compiling
            run = RequestRun(spec, served, start, state.metrics)
            return _stream(request, run) if spec.stream else await _answer(request, run)
        except api.ApiError as exc:
            return error_response(exc)
        except ClientDisconnect:
            return Response(status_code=499)

    async def completions(request: Request) -> Response:
        return await generate(request, "completion")

    async def chat_completions(request: Request) -> Response:
        return await generate(request, "chat")

    async def models(request: Request) -> Response:
        try:
            _check_key(request, config.api_key)
        except api.ApiError as exc:
            return error_response(exc)
        data = [{"id": name, "object": "model", "created": int(time.time()), "owned_by": "gptedge",
                 "context_length": s.capacity, "provider": s.model.provider, "capabilities": s.capabilities}
                for name, s in state.models.items()]
        return JSONResponse({"object": "list", "data": data})

    async def small(request: Request, answer) -> Response:
        """A POST endpoint that is not generation: key, JSON body, model, then `answer(body, served)`."""
        try:
            _check_key(request, config.api_key)
            body = await _read_json(request, config.max_body_bytes, config.body_timeout_s)
            served = _served(state, body.get("model") if isinstance(body, dict) else None)
            return JSONResponse(await asyncio.to_thread(answer, body, served))
        except api.ApiError as exc:
            return error_response(exc)
        except ClientDisconnect:
            return Response(status_code=499)

    def embed(body: Any, served: ServedModel) -> dict[str, Any]:
        if served.batcher is not None:
            raise api.bad(f"model {served.name!r} generates text; serve an embedding bundle (gptedge export "
                          "--embeddings) for /v1/embeddings", "model")
        answer = endpoints.embeddings_response(body, served.name, served.model)
        state.metrics.embedded(served.name, answer["usage"]["prompt_tokens"])
        return answer

    async def embeddings(request: Request) -> Response:
        return await small(request, embed)

    async def tokenize(request: Request) -> Response:
        return await small(request, lambda body, served: endpoints.tokenize_response(body, served.model))

    async def detokenize(request: Request) -> Response:
        return await small(request, lambda body, served: endpoints.detokenize_response(body, served.model))

    async def metrics(request: Request) -> Response:
        try:
            _check_key(request, config.api_key)
        except api.ApiError as exc:
            return error_response(exc)
        return PlainTextResponse(state.metrics.render(state.models), media_type="text/plain; version=0.0.4")

    async def health(request: Request) -> Response:
        if state.error:
            return JSONResponse({"status": "error", "error": state.error}, status_code=500)
        if not state.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok", "models": {
            n: {"active": s.batcher.active, "waiting": s.batcher.waiting} if s.batcher is not None else {}
            for n, s in state.models.items()}})

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def http_error(request: Request, exc: HTTPException) -> Response:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error_response(api.ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                           code=codes.get(exc.status_code)))

    async def crash(request: Request, exc: Exception) -> Response:
        log.exception("gptedge serve: unexpected error")
        return error_response(api.ApiError(500, f"internal error ({type(exc).__name__}); see the server log",
                                           "server_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        threading.Thread(target=state.load, name="gptedge-load", daemon=True).start()
        try:
            yield
        finally:
            await asyncio.to_thread(state.ready.wait)
            state.close()

    middleware = [Middleware(_CountRequests, metrics=state.metrics)]
    if config.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type"]))
    app = Starlette(
        routes=[
            Route("/", page), Route("/health", health), Route("/v1/models", models),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/tokenize", tokenize, methods=["POST"]), Route("/detokenize", detokenize, methods=["POST"]),
            Route("/metrics", metrics),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        middleware=middleware,
        exception_handlers={HTTPException: http_error, Exception: crash},
        lifespan=lifespan,
    )
    app.state.gptedge = state
    return app


class _CountRequests:
    """ASGI wrapper counting every HTTP response by path and status, for /metrics (known paths only)."""

    PATHS = {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/tokenize", "/detokenize",
             "/health", "/metrics"}

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.PATHS else "other"

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.request(path, message["status"])
            await send(message)

        await self.app(scope, receive, counted)
