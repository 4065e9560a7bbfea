"""`openflamingo serve`: load a checkpoint, start the engine thread and the HTTP server (uvicorn)."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_CHECKPOINT = Path("runs/demo/final")
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
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    serve.add_argument("--max-image-bytes", type=int, default=20 * 2**20, help="per image (default 20 MiB)")
    serve.add_argument(
        "--max-image-pixels", type=int, default=40_000_000, help="per image (decompression bombs)"
    )
    serve.add_argument("--max-images", type=int, default=8, help="images per request")
    serve.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for")
    serve.add_argument("--allow-image-urls", action="store_true", help="fetch http(s):// image URLs")
    serve.add_argument(
        "--allow-local-images", type=Path, metavar="DIR", help="read file:// image URLs inside DIR"
    )
    serve.add_argument(
        "--prompt-format",
        help="override the checkpoint's prompt format: 'chat' (the LM's chat template), 'flamingo' (the default "
        "template) or a flamingo template such as 'Question:{question} Short answer:{answer}'",
    )
    serve.add_argument("--model-name", help="the model id clients send (default: the checkpoint path)")
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
        raise FileNotFoundError(
            f"no model to serve: {DEFAULT_CHECKPOINT} does not exist; run `make demo` first, or pass --checkpoint DIR"
        )
    for name in (
        "max_batch_size",
        "max_image_bytes",
        "max_image_pixels",
        "max_images",
        "max_tokens",
        "threads",
    ):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.allow_local_images is not None and not args.allow_local_images.is_dir():
        raise FileNotFoundError(f"--allow-local-images: {args.allow_local_images} is not a directory")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise ImportError(f"{error.name} is missing: pip install 'openflamingo[serve]'") from None
    override = prompt_format_override(args.prompt_format)  # a bad template fails before the model loads
    import torch

    from ..model.checkpoint import load
    from .app import Settings
    from .images import ImagePolicy
    from .protocol import Limits

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    model = load(checkpoint).to(device=device, dtype=getattr(torch, dtype)).eval()
    settings = Settings(
        limits=Limits(
            model_name=args.model_name or str(checkpoint),
            max_images=args.max_images,
            max_tokens=args.max_tokens,
            max_n=args.max_batch_size,
        ),
        images=ImagePolicy(
            max_bytes=args.max_image_bytes,
            max_pixels=args.max_image_pixels,
            allow_urls=args.allow_image_urls,
            local_dir=args.allow_local_images,
        ),
        prompt_format=override or model.config.prompt_format,
        api_key=args.api_key,
    )
    serve(model, settings, args.host, args.port, args.max_batch_size, args.batch_wait_ms / 1000)


def serve(model, settings, host: str, port: int, max_batch_size: int, batch_wait_s: float) -> None:
    """Run until interrupted (Ctrl-C / SIGTERM); prints the page and API URLs once the port is open."""
    import uvicorn

    from .app import create_app
    from .engine import Engine

    engine = Engine(model, max_batch_size=max_batch_size, batch_wait_s=batch_wait_s)
    shown = f"[{host}]" if ":" in host else host
    announce = (
        f"openflamingo serve: chat page http://{shown}:{port}/  API http://{shown}:{port}/v1  "
        f"(model {settings.limits.model_name!r})"
    )
    uvicorn.run(create_app(model, engine, settings, announce), host=host, port=port, log_level="warning")
