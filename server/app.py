"""The HTTP layer: OpenAI routes over the engine. Thin: schemas in, engine events out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from draft_model.checkpoint import load_checkpoint
from draft_model.device import default_dtype, resolve_device
from draft_model.proposer import Proposer, TreeShape
from draft_model.target_weights import read_target_weights
from server.engine import Engine
from server.errors import APIError, error_response, install_error_handlers
from server.prompts import (
    chat_prompt_tokens,
    completion_budget,
    completion_prompt_tokens,
    sampling_params,
)
from server.responses import SSE_DONE, ResponseFormat, sse
from server.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from server.sequence import Sequence, SequenceEvent
from server.settings import Settings
from verifier.target import Target, TargetConfig

log = logging.getLogger("dovetail.server")

DISCONNECT_POLL_SECONDS = 0.25


def build_engine(settings: Settings) -> Engine:
    drafting = settings.draft != "none"
    tree_tokens = settings.draft_tokens if drafting else 1
    target = Target(TargetConfig(
        model_path=settings.model_path,
        num_slots=settings.max_concurrency,
        ctx_size=settings.ctx_size,
        max_tree_nodes=tree_tokens,
        max_tree_branches=tree_tokens,
        batch_size=settings.batch_size,
        num_threads=settings.num_threads,
        flash_attn=settings.flash_attn,
    ))
    if not drafting:
        return Engine(target)
    device = resolve_device(settings.draft_device)
    model = load_checkpoint(settings.draft, read_target_weights(settings.model_path), device,
                            default_dtype(device))
    shape = TreeShape(top_k=settings.draft_top_k, depth=settings.draft_depth,
                      total_tokens=settings.draft_tokens)
    log.info("draft %s on %s: %s", settings.draft, device, shape)
    return Engine(target, Proposer(model, shape))


def create_app(settings: Settings,
               engine_factory: Callable[[Settings], Engine] = build_engine) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.engine = None
        loading = asyncio.create_task(asyncio.to_thread(engine_factory, settings))
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

    async def authorized(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or key.strip() != settings.api_key:
            raise APIError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                           code="invalid_api_key")

    def ready_engine(request: Request) -> Engine:
        engine: Engine | None = request.app.state.engine
        if engine is None:
            raise APIError(503, "the model is still loading", headers={"Retry-After": "5"})
        return engine

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        engine: Engine | None = request.app.state.engine
        if engine is None:
            return JSONResponse({"status": "loading"}, status_code=503,
                                headers={"Retry-After": "5"})
        return JSONResponse({"status": "ok", "active_requests": engine.num_active,
                             "waiting_requests": engine.num_waiting,
                             "free_slots": engine.target.num_free_slots})

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict:
        return {"object": "list", "data": [
            {"id": model_name, "object": "model", "created": int(time.time()),
             "owned_by": "dovetail"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        engine = ready_engine(request)
        prompt = chat_prompt_tokens(engine.target, body)
        budget = completion_budget(len(prompt), body.max_new_tokens, settings.ctx_size,
                                   "max_completion_tokens" if body.max_completion_tokens
                                   else "max_tokens")
        fmt = ResponseFormat("chat", model_name, include_usage=body.include_usage)
        return await _generate(engine, request, body, prompt, budget, fmt, prefix="")

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request):
        engine = ready_engine(request)
        prompt = completion_prompt_tokens(engine.target, body)
        budget = completion_budget(len(prompt), body.max_new_tokens, settings.ctx_size,
                                   "max_tokens")
        fmt = ResponseFormat("text", model_name, include_usage=body.include_usage)
        prefix = ""
        if body.echo:
            prefix = body.prompt if isinstance(body.prompt, str) else \
                engine.tokenizer.decode(list(body.prompt))
        return await _generate(engine, request, body, prompt, budget, fmt, prefix)

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


async def _generate(engine: Engine, request: Request, body: SamplingFields,
                    prompt: list[int], budget: int, fmt: ResponseFormat, prefix: str):
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[SequenceEvent] = asyncio.Queue()
    sequence = Sequence(
        prompt_tokens=prompt,
        params=sampling_params(body, engine.tokenizer.vocab_size),
        max_new_tokens=budget,
        stop=body.stop_strings,
        sink=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
        request_id=fmt.id,
    )
    engine.submit(sequence)
    if body.stream:
        return StreamingResponse(_stream(engine, sequence, events, fmt, prefix),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return await _collect(engine, sequence, events, request, fmt, prefix)


async def _collect(engine: Engine, sequence: Sequence, events: asyncio.Queue,
                   request: Request, fmt: ResponseFormat, prefix: str) -> JSONResponse:
    watcher = asyncio.create_task(_cancel_on_disconnect(engine, sequence, request))
    pieces = [prefix]
    try:
        while True:
            event: SequenceEvent = await events.get()
            pieces.append(event.text)
            if event.finish_reason is not None:
                break
    finally:
        watcher.cancel()
        if not sequence.is_finished:
            engine.cancel(sequence)
    if event.error is not None:
        return error_response(APIError(500, event.error))
    return JSONResponse(fmt.full("".join(pieces), event.finish_reason, event.usage))


async def _cancel_on_disconnect(engine: Engine, sequence: Sequence, request: Request) -> None:
    """A non-streamed request has nothing to write until the end: poll for the client."""
    while not sequence.is_finished:
        if await request.is_disconnected():
            engine.cancel(sequence)
            return
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)


async def _stream(engine: Engine, sequence: Sequence, events: asyncio.Queue,
                  fmt: ResponseFormat, prefix: str) -> AsyncIterator[str]:
    """SSE: role chunk, text chunks, finish chunk, optional usage chunk, [DONE].

    If the client goes away, Starlette stops iterating and `finally` cancels the sequence.
    """
    try:
        if fmt.kind == "chat" or prefix:
            yield fmt.chunk(prefix, is_first=True)
        while True:
            event: SequenceEvent = await events.get()
            if event.text:
                yield fmt.chunk(event.text)
            if event.finish_reason is None:
                continue
            if event.error is not None:
                yield sse({"error": {"message": event.error, "type": "server_error",
                                     "param": None, "code": None}})
            else:
                yield fmt.chunk("", finish_reason=event.finish_reason)
                if fmt.include_usage:
                    yield fmt.usage_chunk(event.usage)
            yield SSE_DONE
            return
    finally:
        if not sequence.is_finished:
            engine.cancel(sequence)
