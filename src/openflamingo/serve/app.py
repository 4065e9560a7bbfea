"""The HTTP app: OpenAI-compatible routes, the chat page, API-key checks and errors in OpenAI's shape.

Handlers parse and prepare a request on a worker thread, hand it to the engine thread and wait for its events
(tokens as they are generated); a streamed answer is sent as Server-Sent Events chunks ending with `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import traceback
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..model.prompt_format import PromptFormat
from .engine import Delta, Engine, Failed, Finished, GenerationJob, ScoreJob
from .errors import ApiError
from .images import ImagePolicy
from .prepare import answer_budget, candidate_ids, prepare_prompt
from .protocol import Limits, parse_chat_request, parse_json, parse_score_request
from .sampling import Sampling


@dataclass(frozen=True)
class Settings:
    limits: Limits
    images: ImagePolicy
    prompt_format: PromptFormat
    api_key: str | None = None

    @property
    def max_body_bytes(self) -> int:
        # Every image at the byte limit, base64-encoded (4/3), plus 1 MiB of text.
        return self.limits.max_images * self.images.max_bytes * 4 // 3 + 2**20


def create_app(model, engine: Engine, settings: Settings, announce: str | None = None) -> FastAPI:
    """The app; it starts `engine` when the server starts (then prints `announce`) and stops it at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        if announce:
            print(announce, flush=True)
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    app = FastAPI(title="openflamingo", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    page = resources.files(__package__).joinpath("static/chat.html").read_text(encoding="utf-8")
    created = int(time.time())
    limits = settings.limits

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {error.detail}"
        return JSONResponse(ApiError(message, status=error.status_code).body(), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        traceback.print_exception(error)
        body = ApiError(f"internal error: {type(error).__name__}: {error}", kind="server_error").body()
        return JSONResponse(body, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request, settings)
        return {"object": "list", "data": [model_card(limits.model_name, created)]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str, request: Request) -> dict:
        authorize(request, settings)
        if name != limits.model_name:
            raise ApiError(f"model {name!r} is not served here", "model", status=404, code="model_not_found")
        return model_card(name, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request, settings)
        chat = parse_chat_request(parse_json(await read_body(request, settings.max_body_bytes)), limits)
        prompt = await run_in_threadpool(
            prepare_prompt, model, settings.prompt_format, chat.conversation, settings.images
        )
        max_tokens = answer_budget(prompt, chat.max_tokens, model, limits.max_tokens)
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job = GenerationJob(
            input_ids=prompt.input_ids,
            images=prompt.images,
            max_tokens=max_tokens,
            stop=chat.stop,
            sampling=[Sampling.for_choice(chat.temperature, chat.top_p, chat.seed, i) for i in range(chat.n)],
            emit=lambda event: _call_soon(loop, events.put_nowait, event),
        )
        engine.submit(job)
        usage = {"prompt_tokens": len(prompt.input_ids), "completion_tokens": 0, "total_tokens": 0}
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": limits.model_name}
        if chat.stream:
            stream = stream_chunks(job, events, head, chat.n, usage if chat.include_usage else None)
            return StreamingResponse(
                stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        texts, reasons = [""] * chat.n, [None] * chat.n
        try:
            async for event in answers(events, chat.n):
                if isinstance(event, Delta):
                    texts[event.choice] += event.text
                else:
                    reasons[event.choice] = event.finish_reason
                    usage["completion_tokens"] += event.completion_tokens
        finally:
            job.cancelled.set()  # no-op once finished; stops the decoding if the client went away
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": texts[i]},
                "logprobs": None,
                "finish_reason": reasons[i],
            }
            for i in range(chat.n)
        ]
        return {**head, "object": "chat.completion", "choices": choices, "usage": usage}

    @app.post("/v1/score")
    async def score(request: Request) -> dict:
        """Log-likelihood of each candidate answer to the last user message (rank classification)."""
        authorize(request, settings)
        scoring = parse_score_request(parse_json(await read_body(request, settings.max_body_bytes)), limits)
        prompt = await run_in_threadpool(
            prepare_prompt, model, settings.prompt_format, scoring.conversation, settings.images
        )
        ids = await run_in_threadpool(candidate_ids, model, settings.prompt_format, scoring.candidates)
        job = ScoreJob(prompt.input_ids, prompt.images, ids)
        engine.submit(job)
        logprobs = await asyncio.wrap_future(job.result)
        data = [
            {
                "object": "score",
                "index": i,
                "candidate": c,
                "logprob": lp,
                "tokens": len(t),
                "mean_logprob": lp / len(t),
            }
            for i, (c, lp, t) in enumerate(zip(scoring.candidates, logprobs, ids, strict=True))
        ]
        candidate_tokens = sum(len(t) for t in ids)
        usage = {
            "prompt_tokens": len(prompt.input_ids),
            "candidate_tokens": candidate_tokens,
            "total_tokens": len(prompt.input_ids) + candidate_tokens,
        }
        return {"object": "list", "model": limits.model_name, "data": data, "usage": usage}

    return app


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "openflamingo"}


def authorize(request: Request, settings: Settings) -> None:
    if settings.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), settings.api_key.encode()):
        raise ApiError(
            "incorrect or missing API key: send the header 'Authorization: Bearer KEY'",
            status=401,
            code="invalid_api_key",
        )


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 past `limit` bytes, before it is all in memory."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(f"request body is {declared} bytes, over this server's limit of {limit}", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(f"request body is over this server's limit of {limit} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


async def answers(events: asyncio.Queue, n: int) -> AsyncIterator[Delta | Finished]:
    """The engine's events for one request until all `n` answers have finished; a failure becomes a 500."""
    finished = 0
    while finished < n:
        event = await events.get()
        if isinstance(event, Failed):
            raise ApiError(f"generation failed: {event.message}", status=500, kind="server_error")
        finished += isinstance(event, Finished)
        yield event


async def stream_chunks(
    job: GenerationJob, events: asyncio.Queue, head: dict, n: int, usage: dict | None
) -> AsyncIterator[str]:
    def chunk(choices: list[dict], **extra) -> str:
        return f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', 'choices': choices, **extra})}\n\n"

    try:
        for i in range(n):
            yield chunk(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
        completion_tokens = 0
        try:
            async for event in answers(events, n):
                if isinstance(event, Delta):
                    delta = {"content": event.text}
                    yield chunk(
                        [{"index": event.choice, "delta": delta, "logprobs": None, "finish_reason": None}]
                    )
                else:
                    completion_tokens += event.completion_tokens
                    finish = {
                        "index": event.choice,
                        "delta": {},
                        "logprobs": None,
                        "finish_reason": event.finish_reason,
                    }
                    yield chunk([finish])
        except (
            ApiError
        ) as error:  # the status line is sent already: the error goes in the stream, as OpenAI does
            yield f"data: {json.dumps(error.body())}\n\n"
            return
        if usage is not None:
            total = usage["prompt_tokens"] + completion_tokens
            yield chunk([], usage={**usage, "completion_tokens": completion_tokens, "total_tokens": total})
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()


def _call_soon(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the event loop closed (server shutting down): nobody is waiting any more
        pass
