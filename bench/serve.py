#!/usr/bin/env python
"""Load test of `openflamingo serve` on 127.0.0.1: 1, 4 and 16 concurrent clients, the same 200 requests each.

    .venv/bin/python bench/serve.py [--checkpoint runs/demo/final] [--clients 1 4 16] [--requests 200]

The server runs as its own process (`openflamingo serve`, CPU, --max-batch-size 16), so its resident memory is
measured alone: after a warm-up (RSS before) and after all runs (RSS after). Requests are easy-VQA conversations
from the test split: 1-4 images, the earlier ones as answered few-shot turns, so prompts run from ~13 to ~60 tokens;
greedy, max_tokens 16. One request in ten is bad, cycling through malformed JSON, an unknown model, a non-image, a
truncated image, too many images, max_tokens out of range, a wrong type and a prompt over the context.

Per level: requests/s, p50/p99 latency of the good requests, completion tokens/s and prompt + completion tokens/s,
failures among the good ones, bad ones answered with a 4xx, and whether every good answer equals the one served
with a single client (batching must not change answers). Prints JSON lines, then a Markdown table.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
BAD_KINDS = (
    "malformed json",
    "unknown model",
    "not an image",
    "truncated image",
    "too many images",
    "max_tokens out of range",
    "wrong type",
    "prompt over context",
)
MAX_IMAGES = 4


def easy_vqa_pool(count: int, seed: int) -> list[tuple[bytes, str, str]]:
    """(PNG bytes, question, answer) triples from easy-VQA's test split."""
    from easy_vqa import get_test_image_paths, get_test_questions

    questions, answers, image_ids = get_test_questions()
    paths = get_test_image_paths()
    order = random.Random(seed).sample(range(len(questions)), count)
    return [(Path(paths[image_ids[i]]).read_bytes(), questions[i], answers[i]) for i in order]


def image_part(png: bytes) -> dict:
    return {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()},
    }


def good_request(model: str, pool: list, rng: random.Random, max_tokens: int) -> dict:
    turns = rng.sample(pool, rng.randint(1, MAX_IMAGES))
    messages = []
    for png, question, answer in turns[:-1]:
        messages += [
            {"role": "user", "content": [image_part(png), {"type": "text", "text": question}]},
            {"role": "assistant", "content": answer},
        ]
    png, question, _ = turns[-1]
    messages.append({"role": "user", "content": [image_part(png), {"type": "text", "text": question}]})
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}


def bad_request(kind: str, good: dict) -> bytes:
    body = json.loads(json.dumps(good))
    if isinstance(
        body["messages"][-1]["content"], str
    ):  # text-only requests: as parts, to spoil like the others
        body["messages"][-1]["content"] = [
            image_part(b""),
            {"type": "text", "text": body["messages"][-1]["content"]},
        ]
    last = body["messages"][-1]["content"]
    if kind == "malformed json":
        return json.dumps(body).encode()[:-7]
    if kind == "unknown model":
        body["model"] = "gpt-4o"
    elif kind == "not an image":
        last[0]["image_url"]["url"] = (
            "data:image/png;base64," + base64.b64encode(b"not a png at all").decode()
        )
    elif kind == "truncated image":
        url = last[0]["image_url"]["url"]
        last[0]["image_url"]["url"] = url[: len(url) // 2 // 4 * 4]
    elif kind == "too many images":
        last[:0] = [last[0]] * MAX_IMAGES
    elif kind == "max_tokens out of range":
        body["max_tokens"] = 0
    elif kind == "wrong type":
        body["temperature"] = "zero"
    elif kind == "prompt over context":
        last[-1]["text"] = "what is the shape? " * 2000
    return json.dumps(body).encode()


def text_request(model: str, rng: random.Random, max_tokens: int) -> dict:
    """A question without images: the frozen LM alone answers, at length (decoding dominates, unlike easy-VQA's
    one-word answers)."""
    topic = rng.choice(["circles", "squares", "triangles", "colors", "shapes", "rectangles"])
    words = rng.randint(1, 12)
    question = f"Write a long story about {topic}" + " and their friends" * words + "."
    return {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


def plan(
    model: str, requests: int, bad_fraction: float, max_tokens: int, seed: int, text_only: bool = False
) -> list[dict]:
    rng = random.Random(seed)
    pool = easy_vqa_pool(200, seed)
    every = round(1 / bad_fraction) if bad_fraction > 0 else 0
    out = []
    for i in range(requests):
        good = (
            text_request(model, rng, max_tokens) if text_only else good_request(model, pool, rng, max_tokens)
        )
        if every and i % every == every - 1:
            kind = BAD_KINDS[(i // every) % len(BAD_KINDS)]
            out.append({"index": i, "bad": kind, "body": bad_request(kind, good)})
        else:
            out.append({"index": i, "bad": None, "body": json.dumps(good).encode()})
    return out


def rss_mib(pid: int) -> float:
    time.sleep(1.0)  # the server hands memory back when it goes idle, just after the last answer
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def run_level(url: str, requests: list[dict], clients: int) -> tuple[list[dict], float]:
    """Every request once, `clients` at a time; returns the per-request records and the wall time."""
    records: list[dict] = []
    lock = threading.Lock()
    pending = iter(requests)

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    request = next(pending, None)
                if request is None:
                    return
                start = time.perf_counter()
                response = http.post(
                    f"{url}/v1/chat/completions",
                    content=request["body"],
                    headers={"Content-Type": "application/json"},
                )
                latency = time.perf_counter() - start
                body = response.json()
                record = {"index": request["index"], "bad": request["bad"], "status": response.status_code}
                record["latency_s"] = latency
                if response.status_code == 200:
                    record["answer"] = body["choices"][0]["message"]["content"]
                    record["prompt_tokens"] = body["usage"]["prompt_tokens"]
                    record["completion_tokens"] = body["usage"]["completion_tokens"]
                with lock:
                    records.append(record)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(records, key=lambda r: r["index"]), time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summarize(clients: int, records: list[dict], wall: float, reference: dict[int, str] | None) -> dict:
    good = [r for r in records if r["bad"] is None]
    ok = [r for r in good if r["status"] == 200]
    bad = [r for r in records if r["bad"] is not None]
    completion = sum(r["completion_tokens"] for r in ok)
    prompt = sum(r["prompt_tokens"] for r in ok)
    latencies = [r["latency_s"] for r in ok]
    summary = {
        "clients": clients,
        "requests": len(records),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(records) / wall, 3),
        "p50_latency_s": round(percentile(latencies, 50), 3),
        "p99_latency_s": round(percentile(latencies, 99), 3),
        "completion_tokens_per_s": round(completion / wall, 2),
        "total_tokens_per_s": round((completion + prompt) / wall, 1),
        "completion_tokens": completion,
        "good_failures": len(good) - len(ok),
        "bad_4xx": sum(400 <= r["status"] < 500 for r in bad),
        "bad": len(bad),
    }
    if reference is not None:
        summary["answers_equal_to_1_client"] = sum(reference.get(r["index"]) == r["answer"] for r in ok)
        summary["good"] = len(ok)
    return summary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=REPO / "runs/demo/final")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--bad-fraction", type=float, default=0.1)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--text-only", action="store_true", help="questions without images that the LM answers at length"
    )
    parser.add_argument(
        "--prompt-format", help="the server's --prompt-format (e.g. chat: the LM's chat template)"
    )
    parser.add_argument("--threads", type=int, help="the server's torch threads (default: torch's choice)")
    args = parser.parse_args()

    port, model = free_port(), "demo"
    command = [sys.executable, "-m", "openflamingo.cli", "serve", "--checkpoint", str(args.checkpoint)]
    command += [
        "--port",
        str(port),
        "--model-name",
        model,
        "--device",
        "cpu",
        "--max-images",
        str(MAX_IMAGES),
    ]
    command += ["--max-batch-size", str(args.max_batch_size)]
    command += ["--threads", str(args.threads)] if args.threads else []
    command += ["--prompt-format", args.prompt_format] if args.prompt_format else []
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = server.stdout.readline()
        if "http://" not in line:
            raise SystemExit(f"the server did not start: {line!r}")
        url = f"http://127.0.0.1:{port}"
        requests = plan(model, args.requests, args.bad_fraction, args.max_tokens, args.seed, args.text_only)
        run_level(url, requests[:8], 4)  # warm-up: first calls allocate caches and buffers
        before = rss_mib(server.pid)
        print(
            json.dumps(
                {
                    "server_pid": server.pid,
                    "rss_mib_before": round(before, 1),
                    "cpus": os.cpu_count(),
                }
            )
        )
        reference, rows = None, []
        for clients in args.clients:
            records, wall = run_level(url, requests, clients)
            summary = summarize(clients, records, wall, reference)
            if reference is None:
                reference = {
                    r["index"]: r["answer"] for r in records if r["status"] == 200 and r["bad"] is None
                }
            summary["rss_mib"] = round(rss_mib(server.pid), 1)
            summary["load_average_1min"] = os.getloadavg()[
                0
            ]  # this machine is shared: foreign load shows here
            rows.append(summary)
            print(json.dumps(summary), flush=True)
        after = rss_mib(server.pid)
        growth = (after - before) / before
        print(
            json.dumps(
                {
                    "rss_mib_before": round(before, 1),
                    "rss_mib_after": round(after, 1),
                    "rss_growth": round(growth, 4),
                }
            )
        )
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
    print()
    print(
        "| clients | requests/s | p50 latency | p99 latency | completion tokens/s | prompt+completion tokens/s | good failures | bad -> 4xx | answers = 1 client | RSS after level |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        equal = f"{r['answers_equal_to_1_client']}/{r['good']}" if "good" in r else "(reference)"
        print(
            f"| {r['clients']} | {r['requests_per_s']:.2f} | {r['p50_latency_s']:.2f} s | {r['p99_latency_s']:.2f} s | "
            f"{r['completion_tokens_per_s']:.1f} | {r['total_tokens_per_s']:.0f} | {r['good_failures']} | "
            f"{r['bad_4xx']}/{r['bad']} | {equal} | {r['rss_mib']:.0f} MiB |"
        )
    print(f"\nRSS {before:.0f} MiB after warm-up, {after:.0f} MiB after all runs ({100 * growth:+.1f}%)")


if __name__ == "__main__":
    main()
