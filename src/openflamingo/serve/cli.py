"""`openflamingo serve`: load a checkpoint, start the engine thread and the HTTP server (uvicorn)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
from pathlib import Path

from ..errors import InputError, MissingDependencyError, MissingFileError

log = logging.getLogger("openflamingo.serve")

DEFAULT_CHECKPOINT = Path("runs/demo/final")
API_KEY_VARIABLE = "OPENFLAMINGO_API_KEY"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def register(commands) -> None:
    serve = commands.add_parser(
        "serve", help="an OpenAI-compatible API (/v1/chat/completions, /v1/score) and a chat page for a model"
    )
    serve.add_argument(
        "--checkpoint",
        type=Path,
        help=f"a save_pretrained directory (default: {DEFAULT_CHECKPOINT}, made by make demo)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    serve.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on GPUs, float32 on CPUs"
    )
    serve.add_argument(
        "--max-batch-size", type=int, default=16, help="answers decoded together (and the most n)"
    )
    serve.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    serve.add_argument(
        "--batch-wait-ms", type=float, default=5.0, help="how long an idle server gathers a batch"
    )
    serve.add_argument(
        "--api-key",
        help=f"require 'Authorization: Bearer KEY' on /v1 routes (or set {API_KEY_VARIABLE}, or --api-key-file)",
    )
    serve.add_argument(
        "--api-key-file", type=Path, help="read the API key from this file (keeps it out of ps)"
    )
    serve.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name served without an API key besides IP addresses and localhost (repeatable)",
    )
    serve.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting for the engine; past it, 429 (default 64)"
    )
    serve.add_argument(
        "--request-timeout", type=float, default=300.0, help="seconds from arrival to the last token (300)"
    )
    serve.add_argument(
        "--read-timeout",
        type=float,
        default=30.0,
        help="seconds to receive a request's head, and its body (30)",
    )
    serve.add_argument(
        "--max-connections", type=int, default=256, help="open connections; past it, 503 (default 256)"
    )
    serve.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        help="seconds running requests get to finish on SIGTERM / Ctrl-C (30)",
    )
    serve.add_argument(
        "--prefill-chunk",
        type=int,
        default=256,
        help="prompt tokens per forward: a longer prompt is prefilled in chunks between decode steps (256)",
    )
    serve.add_argument(
        "--bulk-share",
        type=float,
        default=0.25,
        help="most of the engine's time long prefills and /v1/score get while other requests wait (0.25)",
    )
    serve.add_argument("--max-stop-chars", type=int, default=256, help="characters per stop sequence (256)")
    serve.add_argument(
        "--max-score-tokens", type=int, default=8192, help="candidate tokens per /v1/score request (8192)"
    )
    serve.add_argument("--max-candidates", type=int, default=10_000, help="candidates per /v1/score request")
    serve.add_argument("--max-image-bytes", type=int, default=20 * 2**20, help="per image (default 20 MiB)")
    serve.add_argument(
        "--max-image-pixels", type=int, default=40_000_000, help="per image (decompression bombs)"
    )
    serve.add_argument("--max-images", type=int, default=8, help="images per request")
    serve.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for")
    serve.add_argument(
        "--max-image-aspect-ratio",
        type=float,
        default=20.0,
        help="refuse images whose longer side is more than this many times the shorter (default 20)",
    )
    serve.add_argument(
        "--allow-image-urls",
        action="store_true",
        help="fetch http(s):// image URLs (publicly routable addresses only, unless --trust-image-network)",
    )
    serve.add_argument(
        "--trust-image-network",
        action="append",
        default=[],
        type=ipaddress.ip_network,
        metavar="CIDR",
        help="with --allow-image-urls, also fetch from this network, e.g. 10.0.0.0/8 (repeatable)",
    )
    serve.add_argument(
        "--image-url-timeout", type=float, default=10.0, help="seconds for one image download, all of it (10)"
    )
    serve.add_argument(
        "--allow-local-images", type=Path, metavar="DIR", help="read file:// image URLs inside DIR"
    )
    serve.add_argument(
        "--prompt-format",
        help="override the checkpoint's prompt format: 'chat' (the LM's chat template), 'flamingo' (the default "
        "template) or a flamingo template such as 'Question:{question} Short answer:{answer}'",
    )
    serve.add_argument(
        "--model-name", help="the model id clients send (default: the checkpoint directory's name)"
    )
    serve.set_defaults(run=run)


def prompt_format_override(value: str | None):
    """--prompt-format as a PromptFormat, or None to keep the one recorded in the checkpoint."""
    from ..model.prompt_format import PromptFormat

    if value is None:
        return None
    if value in ("chat", "flamingo"):
        return PromptFormat(kind=value)
    return PromptFormat(kind="flamingo", template=value)


def run(args: argparse.Namespace) -> None:
    checkpoint = args.checkpoint or DEFAULT_CHECKPOINT
    if args.checkpoint is None and not (DEFAULT_CHECKPOINT / "config.json").is_file():
        raise MissingFileError(
            f"no model to serve: {DEFAULT_CHECKPOINT} does not exist; run `make demo` first, or pass --checkpoint DIR"
        )
    for name in (
        "max_batch_size",
        "max_image_bytes",
        "max_image_pixels",
        "max_images",
        "max_tokens",
        "threads",
        "max_queue",
        "max_connections",
        "max_stop_chars",
        "max_score_tokens",
        "max_candidates",
        "request_timeout",
        "read_timeout",
        "shutdown_grace",
        "max_image_aspect_ratio",
        "image_url_timeout",
        "prefill_chunk",
    ):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if not 0 < args.bulk_share < 1:
        raise InputError(f"--bulk-share must be between 0 and 1, got {args.bulk_share}")
    api_key = read_api_key(args)
    if api_key is None and args.host not in LOOPBACK:
        log.warning(
            "serving on %s without an API key: anyone who can reach this port can use the model "
            "(--api-key, --api-key-file or %s)",
            args.host,
            API_KEY_VARIABLE,
        )
    if args.allow_local_images is not None and not args.allow_local_images.is_dir():
        raise MissingFileError(f"--allow-local-images: {args.allow_local_images} is not a directory")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise MissingDependencyError(f"{error.name} is missing: pip install 'openflamingo[serve]'") from None
    override = prompt_format_override(args.prompt_format)  # a bad template fails before the model loads
    import torch

    from ..model.checkpoint import load
    from .app import Settings
    from .engine import Engine
    from .images import ImagePolicy
    from .protocol import Limits

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    model = load(checkpoint).to(device=device, dtype=getattr(torch, dtype)).eval()
    settings = Settings(
        limits=Limits(
            model_name=args.model_name or checkpoint.resolve().name,
            max_images=args.max_images,
            max_tokens=args.max_tokens,
            max_n=args.max_batch_size,
            max_candidates=args.max_candidates,
            max_score_tokens=args.max_score_tokens,
            max_stop_chars=args.max_stop_chars,
        ),
        images=ImagePolicy(
            max_bytes=args.max_image_bytes,
            max_pixels=args.max_image_pixels,
            allow_urls=args.allow_image_urls,
            local_dir=args.allow_local_images,
            url_timeout_s=args.image_url_timeout,
            max_aspect_ratio=args.max_image_aspect_ratio,
            trusted_networks=tuple(args.trust_image_network),
            # JPEGs are decoded at the smallest DCT scale that keeps both sides >= the encoder's input
            draft_size=model.vision_encoder.image_size,
        ),
        prompt_format=override or model.config.prompt_format,
        api_key=api_key,
        allowed_hosts=frozenset([*args.allowed_host, args.host]),
        request_timeout_s=args.request_timeout,
        read_timeout_s=args.read_timeout,
    )
    engine = Engine(
        model,
        max_batch_size=args.max_batch_size,
        batch_wait_s=args.batch_wait_ms / 1000,
        max_queue=args.max_queue,
        prefill_chunk=args.prefill_chunk,
        bulk_share=args.bulk_share,
    )
    serve(model, engine, settings, args.host, args.port, args.max_connections, args.shutdown_grace)


def read_api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else --api-key-file, else $OPENFLAMINGO_API_KEY; an empty key is an error, not "no key"."""
    if args.api_key is not None:
        key, source = args.api_key, "--api-key"
    elif args.api_key_file is not None:
        try:
            key, source = (
                args.api_key_file.read_text(encoding="utf-8").strip(),
                f"--api-key-file {args.api_key_file}",
            )
        except OSError as error:
            raise MissingFileError(
                f"--api-key-file: cannot read {args.api_key_file} ({error.strerror})"
            ) from None
    elif API_KEY_VARIABLE in os.environ:
        key, source = os.environ[API_KEY_VARIABLE], API_KEY_VARIABLE
    else:
        return None
    if not key.strip():
        raise InputError(f"{source}: the API key is empty")
    return key.strip()


def serve(
    model, engine, settings, host: str, port: int, max_connections: int, shutdown_grace_s: float
) -> None:
    """Run until SIGTERM / Ctrl-C, then drain; prints the page and API URLs once the port is open."""
    import uvicorn

    from .app import create_app
    from .http import server_config

    shown = f"[{host}]" if ":" in host else host
    announce = (
        f"openflamingo serve: chat page http://{shown}:{port}/  API http://{shown}:{port}/v1  "
        f"(model {settings.limits.model_name!r})"
    )
    app = create_app(model, engine, settings, announce)
    config = server_config(app, host, port, settings.read_timeout_s, max_connections, shutdown_grace_s)
    # Once it has drained, uvicorn raises the signal it stopped on again, for the handler it found: make that handler
    # a no-op, so that a drained shutdown exits 0 instead of dying of SIGTERM or raising KeyboardInterrupt.
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {stop: signal.signal(stop, lambda *_: None) for stop in stops}
    try:
        uvicorn.Server(config).run()
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)
