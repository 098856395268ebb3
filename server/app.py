"""The HTTP layer: OpenAI routes over the engine. Thin: schemas in, engine events out."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from server.builder import build_engine, draft_label
from server.constraints.requests import Structure, request_structure
from server.constraints.tools import ToolCallParser
from server.engine import Engine
from server.engine.logprobs import TokenLogprob
from server.engine.sequence import Sequence, SequenceEvent
from server.errors import (
    APIError,
    CatchUnexpected,
    error_body,
    error_response,
    install_error_handlers,
)
from server.metrics import CONTENT_TYPE, Metrics
from server.middleware import CountRequests, LimitBody, RequireKey
from server.prompts import (
    chat_prompt_tokens,
    completion_budget,
    completion_prompt_tokens,
    requested_logprobs,
    sampling_params,
)
from server.responses import SSE_DONE, ResponseFormat, sse
from server.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from server.settings import Settings
from verifier.kernels import exactness
from verifier.machine import run_on_fresh_thread

log = logging.getLogger("dovetail.server")

DISCONNECT_POLL_SECONDS = 0.25
MAX_BODY_BYTES = 8 * 2**20  # far beyond any context; refused before it is read or tokenized
PAGE = Path(__file__).resolve().parent / "static"  # the chat page: plain files, no build step


def create_app(settings: Settings,
               engine_factory: Callable[[Settings], Engine] = build_engine) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.engine = None
        # Built on a thread that ends when the engine is ready: OpenMP worker pools that
        # loading leaves behind (PyTorch copies of the draft, the cost measurement) end with
        # it instead of slowing the engine thread's decodes (machine.run_on_fresh_thread).
        loading = asyncio.create_task(asyncio.to_thread(run_on_fresh_thread, engine_factory,
                                                        settings))
        # Serve /health (503) while the model loads.
        loading.add_done_callback(lambda task: _engine_ready(app, task))
        try:
            yield
        finally:
            if not loading.done():
                loading.cancel()
            engine: Engine | None = app.state.engine
            if engine is not None:
                await asyncio.to_thread(engine.stop)
                engine.target.close()

    app = FastAPI(title="Dovetail", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    model_name = settings.served_model_name
    metrics = app.state.metrics = Metrics(lambda: getattr(app.state, "engine", None))
    app.add_middleware(LimitBody, max_bytes=MAX_BODY_BYTES)
    if settings.api_key is not None:
        app.add_middleware(RequireKey, key=settings.api_key)  # before anything is read
    app.add_middleware(CatchUnexpected)
    # outermost: counts the 500s too, and the 401s and 413s answered before routing
    app.add_middleware(CountRequests, metrics=metrics, routes=app.router.routes)

    def ready_engine(request: Request) -> Engine:
        engine: Engine | None = request.app.state.engine
        if engine is None:
            raise APIError(503, "the model is still loading", headers={"Retry-After": "5"})
        if engine.is_draining:
            raise APIError(503, "the server is shutting down", headers={"Retry-After": "5"})
        if engine.num_waiting >= settings.max_queue:
            raise APIError(429, f"the server is busy: {engine.num_waiting} requests are "
                           "waiting for a slot; retry later", code="server_busy",
                           headers={"Retry-After": "1"})
        return engine

    app.mount("/static", StaticFiles(directory=PAGE), name="static")
    served = {"draft": draft_label(settings), "threads": settings.num_threads}

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(PAGE / "index.html")

    @app.get("/metrics")
    async def prometheus_metrics(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        engine: Engine | None = request.app.state.engine
        if engine is None:
            return JSONResponse({"status": "loading"}, status_code=503,
                                headers={"Retry-After": "5"})
        if engine.is_draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok", "active_requests": engine.num_active,
                             "waiting_requests": engine.num_waiting,
                             "free_slots": engine.target.num_free_slots, **served,
                             **exactness(engine.target.chains_only,
                                         engine.target.config.flash_attn)})

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": int(time.time()),
                "owned_by": "dovetail"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:
        if model != model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                           f"{model_name!r}", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        engine = ready_engine(request)
        prompt = chat_prompt_tokens(engine.target, body)
        budget = completion_budget(len(prompt), body.max_new_tokens, settings.ctx_size,
                                   "max_completion_tokens" if body.max_completion_tokens
                                   else "max_tokens")
        # (a large schema compiles for a while: off the event loop)
        structure = await asyncio.to_thread(request_structure, engine.tokenizer, body)
        fmt = ResponseFormat("chat", model_name, include_usage=body.include_usage,
                             top_logprobs=requested_logprobs(body),
                             include_speculation=body.include_speculation)
        return await _generate(engine, request, body, prompt, budget, fmt, prefix="",
                               timeout=settings.request_timeout, structure=structure)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        engine = ready_engine(request)
        prompt = completion_prompt_tokens(engine.target, body)
        budget = completion_budget(len(prompt), body.max_new_tokens, settings.ctx_size,
                                   "max_tokens")
        prefix = ""
        if body.echo:
            prefix = body.prompt if isinstance(body.prompt, str) else \
                engine.tokenizer.decode(list(body.prompt))
        top_logprobs = requested_logprobs(body)
        # (a large schema compiles for a while: off the event loop)
        structure = await asyncio.to_thread(request_structure, engine.tokenizer, body)
        fmt = ResponseFormat("text", model_name, include_usage=body.include_usage,
                             top_logprobs=top_logprobs, prefix_length=len(prefix),
                             prompt_logprobs=body.echo and top_logprobs is not None,
                             include_speculation=body.include_speculation)
        return await _generate(engine, request, body, prompt, budget, fmt, prefix,
                               timeout=settings.request_timeout, structure=structure)

    return app


def _engine_ready(app: FastAPI, task: asyncio.Task) -> None:
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:
        log.error("loading the model failed: %s", error)
        os.kill(os.getpid(), signal.SIGTERM)  # a server that cannot serve should not linger
        return
    engine: Engine = task.result()
    engine.start()
    app.state.engine = engine
    log.info("model loaded; ready")


class _RequestClock:
    """Arrival, first token and end of one request: its metrics and its log line."""

    def __init__(self, metrics: Metrics, request_id: str) -> None:
        self.metrics, self.request_id = metrics, request_id
        self.arrival = time.monotonic()
        self.first_token: float | None = None

    def event(self, event: SequenceEvent) -> None:
        if self.first_token is None and (event.text or event.usage is not None):
            self.first_token = time.monotonic() - self.arrival

    def finish(self, sequence: Sequence, status: str) -> None:
        total = time.monotonic() - self.arrival
        completion = len(sequence.output_tokens)
        self.metrics.observe_request(len(sequence.prompt_tokens), completion,
                                     self.first_token, total)
        steps = sequence.num_verify_steps
        log.info(json.dumps({
            "request_id": self.request_id, "status": status,
            "prompt_tokens": len(sequence.prompt_tokens), "completion_tokens": completion,
            "tau": round(sequence.num_chosen / steps, 3) if steps else None,
            "ttft_s": None if self.first_token is None else round(self.first_token, 4),
            "latency_s": round(total, 4)}))


REJECTED = APIError(503, "no slot became free before the request's deadline, or the server "
                    "is shutting down; retry later", headers={"Retry-After": "5"})


async def _generate(engine: Engine, request: Request, body: SamplingFields,
                    prompt: list[int], budget: int, fmt: ResponseFormat, prefix: str,
                    timeout: float, structure: Structure):
    clock = _RequestClock(request.app.state.metrics, fmt.id)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[SequenceEvent] = asyncio.Queue()
    sequence = Sequence(
        prompt_tokens=prompt,
        params=sampling_params(body, engine.tokenizer.vocab_size),
        max_new_tokens=budget,
        stop=body.stop_strings,
        sink=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
        request_id=fmt.id,
        logprobs=fmt.top_logprobs,
        prompt_logprobs=fmt.prompt_logprobs,
        deadline=clock.arrival + timeout if timeout else None,
        grammar=structure.grammar,
        track_sources=fmt.include_speculation,
    )
    engine.submit(sequence)
    tools = structure.tool_parser()
    if body.stream:
        return StreamingResponse(_stream(engine, sequence, events, fmt, prefix, clock, tools),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return await _collect(engine, sequence, events, request, fmt, prefix, clock, tools)


async def _collect(engine: Engine, sequence: Sequence, events: asyncio.Queue,
                   request: Request, fmt: ResponseFormat, prefix: str,
                   clock: _RequestClock, tools: ToolCallParser | None) -> JSONResponse:
    watcher = asyncio.create_task(_cancel_on_disconnect(engine, sequence, request))
    pieces = [prefix]
    logprobs: list[TokenLogprob] = []
    prompt_logprobs: list[TokenLogprob] = []
    event = SequenceEvent(finish_reason="cancelled")
    try:
        while True:
            event = await events.get()
            clock.event(event)
            pieces.append(event.text)
            logprobs.extend(event.logprobs)
            prompt_logprobs.extend(event.prompt_logprobs)
            if event.finish_reason is not None:
                break
    finally:
        watcher.cancel()
        if not sequence.is_finished:
            engine.cancel(sequence)
        clock.finish(sequence, "error" if event.error is not None
                     else event.finish_reason or "cancelled")
    if event.error is not None:
        return error_response(APIError(500, event.error))
    if event.finish_reason == "rejected":
        return error_response(REJECTED)
    text = "".join(pieces)
    calls: list[dict] = []
    if tools is not None:
        text, _ = tools.push(text)
        text += tools.flush()
        calls = [call.as_dict() for call in tools.calls]
    return JSONResponse(fmt.full(text, event.finish_reason, event.usage, logprobs,
                                 prompt_logprobs, calls,
                                 made_calls=tools is not None and tools.made_calls))


async def _cancel_on_disconnect(engine: Engine, sequence: Sequence, request: Request) -> None:
    """A non-streamed request has nothing to write until the end: poll for the client."""
    while not sequence.is_finished:
        if await request.is_disconnected():
            engine.cancel(sequence)
            return
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)


async def _stream(engine: Engine, sequence: Sequence, events: asyncio.Queue,
                  fmt: ResponseFormat, prefix: str, clock: _RequestClock,
                  tools: ToolCallParser | None) -> AsyncIterator[str]:
    """SSE: role chunk, text chunks, finish chunk, optional usage chunk, [DONE]. With tools,
    the text is split into content chunks and tool-call chunks as it arrives.

    If the client goes away, Starlette stops iterating and `finally` cancels the sequence.
    """
    status = "cancelled"
    try:
        if fmt.kind == "chat" or prefix:
            yield fmt.chunk(prefix, is_first=True)
        while True:
            event: SequenceEvent = await events.get()
            clock.event(event)
            text, deltas = event.text, []
            if tools is not None:
                text, deltas = tools.push(text)
                if event.finish_reason is not None:
                    text += tools.flush()
            # (the last event's speculation goes with the finish chunk if it has no text)
            sources, steps = event.sources, event.steps
            if text or event.logprobs or event.prompt_logprobs or (
                    (sources or steps) and event.finish_reason is None):
                yield fmt.chunk(text, logprobs=event.logprobs,
                                prompt_logprobs=event.prompt_logprobs, sources=sources,
                                steps=steps)
                sources, steps = (), ()
            if deltas:
                yield fmt.tool_calls_chunk(deltas)
            if event.finish_reason is None:
                continue
            if event.error is not None:
                yield sse(error_body(500, event.error))
            elif event.finish_reason == "rejected":
                yield sse(error_body(REJECTED.status, REJECTED.message))
            else:
                yield fmt.chunk("", finish_reason=event.finish_reason,
                                made_calls=tools is not None and tools.made_calls,
                                sources=sources, steps=steps)
                if fmt.include_usage:
                    yield fmt.usage_chunk(event.usage)
            status = "error" if event.error is not None else event.finish_reason
            yield SSE_DONE
            return
    finally:
        if not sequence.is_finished:
            engine.cancel(sequence)
        clock.finish(sequence, status)
