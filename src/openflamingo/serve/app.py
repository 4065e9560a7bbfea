"""The HTTP app: OpenAI-compatible routes, the chat page, API-key and Host checks, and errors in OpenAI's shape.

Handlers parse and prepare a request on a worker thread, hand it to the engine thread and wait for its events
(tokens as they are generated); a streamed answer is sent as Server-Sent Events chunks ending with `data: [DONE]`.
Every request has a deadline (--request-timeout) and is cancelled when its client goes away, streamed or not: the
engine then frees its batch rows before its next step. A full waiting line is a 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from importlib import resources

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..errors import InputError
from ..model.prompt_format import PromptFormat
from .engine import Delta, Engine, EngineStopped, Failed, Finished, GenerationJob, QueueFull
from .errors import ApiError
from .images import ImagePolicy
from .prepare import Prompt, answer_budget, candidate_ids, context_length, prepare_prompt, text_budget
from .protocol import Conversation, Limits, parse_chat_request, parse_json, parse_score_request
from .sampling import Sampling
from .scoring import ScoreJob

log = logging.getLogger("openflamingo.serve")
LOCAL_NAMES = ("localhost", "localhost.")


@dataclass(frozen=True)
class Settings:
    limits: Limits
    images: ImagePolicy
    prompt_format: PromptFormat
    api_key: str | None = None
    # Host names (besides IP literals and localhost) served without an API key; DNS rebinding sends others.
    allowed_hosts: frozenset[str] = frozenset()
    request_timeout_s: float = 300.0  # arrival to last token, waiting in line included
    read_timeout_s: float = 30.0  # to receive a request's body
    stall_s: float = 60.0  # /health fails when the engine has not gone round its loop for this long
    retry_after_s: int = 1  # what a 429 tells the client to wait

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise InputError("the API key is empty; give a key, or none to serve without one")

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
    if settings.api_key is None:
        app.add_middleware(HostCheck, allowed=settings.allowed_hosts)
    page = resources.files(__package__).joinpath("static/chat.html").read_text(encoding="utf-8")
    page_headers = {
        "Content-Security-Policy": content_security_policy(page),
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
    }
    created = int(time.time())
    limits = replace(settings.limits, max_text_chars=text_budget(model))
    # Preparing a request decodes its images: one request per core at a time, so that many large images sent at
    # once cost time in line, not memory.
    preparing = anyio.CapacityLimiter(os.cpu_count() or 1)

    async def parse(parser, body: bytes):
        """The request, parsed and checked off the event loop (a body of 20 MiB takes a while)."""
        return await run_in_threadpool(lambda: parser(parse_json(body), limits))

    async def prepare(conversation: Conversation) -> Prompt:
        return await anyio.to_thread.run_sync(
            prepare_prompt, model, settings.prompt_format, conversation, settings.images, limiter=preparing
        )

    context = context_length(model)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {error.detail}"
        return JSONResponse(ApiError(message, status=error.status_code).body(), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        request_id = uuid.uuid4().hex
        log.error("request %s (%s %s) failed", request_id, request.method, request.url.path, exc_info=error)
        return JSONResponse(internal_error(request_id).body(), status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(page, headers=page_headers)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        stalled = engine.stalled_for()
        if stalled > settings.stall_s:
            return JSONResponse({"status": f"engine stalled for {stalled:.0f} s"}, status_code=503)
        return JSONResponse({"status": "ok", "running": engine.rows, "queued": engine.queued})

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
        deadline = time.monotonic() + settings.request_timeout_s
        authorize(request, settings)
        chat = await parse(parse_chat_request, await read_body(request, settings))
        prompt = await prepare(chat.conversation)
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
        submit(engine, job, settings)
        usage = {"prompt_tokens": len(prompt.input_ids), "completion_tokens": 0, "total_tokens": 0}
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": limits.model_name}
        if chat.stream:
            # Starlette cancels the stream when the client disconnects; its `finally` cancels the job.
            stream = stream_chunks(job, events, head, chat.n, usage if chat.include_usage else None, deadline)
            return StreamingResponse(
                stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        texts, reasons = [""] * chat.n, [None] * chat.n

        async def collect() -> None:
            async for event in answers(events, chat.n, deadline, head["id"]):
                if isinstance(event, Delta):
                    texts[event.choice] += event.text
                else:
                    reasons[event.choice] = event.finish_reason
                    usage["completion_tokens"] += event.completion_tokens

        await until_disconnected(request, collect(), job)
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
        deadline = time.monotonic() + settings.request_timeout_s
        authorize(request, settings)
        scoring = await parse(parse_score_request, await read_body(request, settings))
        prompt = await prepare(scoring.conversation)
        ids = await run_in_threadpool(candidate_ids, model, settings.prompt_format, scoring.candidates)
        check_candidates(ids, len(prompt.input_ids), context, limits)
        job = ScoreJob(prompt.input_ids, prompt.images, ids)
        submit(engine, job, settings)
        request_id = f"score-{uuid.uuid4().hex}"

        async def result() -> list[float]:
            try:
                return await asyncio.wait_for(asyncio.wrap_future(job.result), deadline - time.monotonic())
            except TimeoutError:
                raise timed_out() from None
            except EngineStopped:
                raise shutting_down() from None
            except RuntimeError:  # the engine logged why
                raise internal_error(request_id) from None

        logprobs = await until_disconnected(request, result(), job)
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


async def read_body(request: Request, settings: Settings) -> bytes:
    """The JSON body, refused with a 413 past the size limit before it is all in memory, and with a 408 when it
    does not arrive within the read timeout. A body that is not declared JSON is refused (415): a web page can send
    text/plain across sites without asking, JSON it cannot."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(
            f"Content-Type must be application/json, got {kind[:60] or 'none'!r}",
            status=415,
            code="invalid_type",
        )
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise body_too_large(f"{declared} bytes", limit)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(settings.read_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise body_too_large("larger", limit)
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(
            f"the request body did not arrive within {settings.read_timeout_s:g} s (--read-timeout)",
            status=408,
            code="request_timeout",
        ) from None
    return b"".join(chunks)


def body_too_large(size: str, limit: int) -> ApiError:
    return ApiError(
        f"request body is {size}, over this server's limit of {limit} bytes (--max-images x --max-image-bytes, "
        "base64-encoded, + 1 MiB)",
        status=413,
        code="request_too_large",
    )


def check_candidates(ids: list[list[int]], prompt_tokens: int, context: int | None, limits: Limits) -> None:
    """/v1/score work bounded before it starts: all candidates' tokens, and each one after the prompt in the
    context (positions past a learned position table would index out of it)."""
    longest = max(range(len(ids)), key=lambda i: len(ids[i]))
    if context is not None and prompt_tokens + len(ids[longest]) > context:
        raise ApiError(
            f"candidates[{longest}]: the prompt ({prompt_tokens} tokens) and this candidate "
            f"({len(ids[longest])}) exceed this model's maximum context length of {context} tokens",
            f"candidates[{longest}]",
            code="context_length_exceeded",
        )
    total = sum(len(t) for t in ids)
    if total > limits.max_score_tokens:
        raise ApiError(
            f"candidates: {total} tokens in all, over this server's limit of {limits.max_score_tokens} "
            "(--max-score-tokens)",
            "candidates",
            code="too_many_tokens",
        )


def submit(engine: Engine, job, settings: Settings) -> None:
    try:
        engine.submit(job)
    except QueueFull:
        raise ApiError(
            f"the server is busy: {engine.max_queue} requests are waiting already (--max-queue); retry later",
            status=429,
            code="rate_limit_exceeded",
            kind="rate_limit_error",
            headers={"Retry-After": str(settings.retry_after_s)},
        ) from None
    except EngineStopped:
        raise shutting_down() from None


def shutting_down() -> ApiError:
    return ApiError(
        "the server's engine has stopped (the server is shutting down, or failed: see its log)",
        status=503,
        code="unavailable",
        kind="server_error",
    )


def internal_error(request_id: str) -> ApiError:
    return ApiError(
        f"internal error; the server log has the details under request id {request_id}",
        status=500,
        kind="server_error",
    )


def timed_out() -> ApiError:
    return ApiError(
        "the request did not finish within this server's deadline (--request-timeout)",
        status=504,
        code="request_timeout",
        kind="server_error",
    )


async def until_disconnected(request: Request, work: Awaitable, job) -> object:
    """`work`'s result; if the client disconnects first, the job is cancelled (its rows leave the batch at the
    next step) and nothing is answered. The body has been read, so the next ASGI message is the disconnect."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ApiError("the client disconnected", status=499, code="client_closed_request")
    finally:
        job.cancelled.set()  # no-op once finished
        task.cancel()
        gone.cancel()


async def answers(
    events: asyncio.Queue, n: int, deadline: float, request_id: str
) -> AsyncIterator[Delta | Finished]:
    """The engine's events for one request until all `n` answers have finished, or the deadline passes."""
    finished = 0
    while finished < n:
        try:
            event = await asyncio.wait_for(events.get(), deadline - time.monotonic())
        except TimeoutError:
            raise timed_out() from None
        if isinstance(event, Failed):
            raise shutting_down() if event.shutdown else internal_error(request_id)
        finished += isinstance(event, Finished)
        yield event


async def stream_chunks(
    job: GenerationJob, events: asyncio.Queue, head: dict, n: int, usage: dict | None, deadline: float
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
            async for event in answers(events, n, deadline, head["id"]):
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


class HostCheck:
    """Without an API key, only requests addressed to this machine by IP, as localhost or by an allowed name are
    served: a web page that rebinds its own domain name to 127.0.0.1 (DNS rebinding) sends its own name as Host."""

    def __init__(self, app, allowed: frozenset[str]):
        self.app = app
        self.allowed = {name.lower().rstrip(".") for name in allowed}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host and not self.allowed_host(host):
                error = ApiError(
                    f"Host {host[:80]!r} is not served without an API key (--allowed-host NAME, or --api-key)",
                    status=403,
                    code="host_not_allowed",
                )
                await JSONResponse(error.body(), status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def allowed_host(self, host: str) -> bool:
        name = re.sub(r":\d*$", "", host).strip("[]").lower().rstrip(".")
        if name in LOCAL_NAMES or name.endswith(".localhost") or name in self.allowed:
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True


def content_security_policy(page: str) -> str:
    """The chat page may run only its own inline script and style (by hash), show data:/blob: images and talk to
    this server."""

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.DOTALL)
        return " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks
        )

    return (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; img-src data: blob:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def _call_soon(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the event loop closed (server shutting down): nobody is waiting any more
        pass
