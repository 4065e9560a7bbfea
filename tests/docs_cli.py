"""A warm `openflamingo` command for tests/test_docs.py: the documentation's shell blocks call `openflamingo` some 30
times, and each fresh start spends ~5 s of a 2-core machine importing torch and transformers before it does anything.

`python docs_cli.py serve SOCKET` imports the package once (and the modules its commands import lazily), then for
each request forks: the child takes the caller's working directory, environment and stdin/stdout/stderr and runs
`openflamingo.cli.main(argv)`, the function the installed console script runs, and its exit status becomes the
caller's. `client()` is the caller: the `openflamingo` (and `parse-only openflamingo`, which only parses the
arguments with the CLI's own parser) that test_docs.py puts first on PATH. Nothing but the standard library is
imported at the top, so a client starts in milliseconds.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import sys

# Imported by the commands on first use; importing them before forking saves each command that time.
WARM_MODULES = (
    "openflamingo.cli",
    "openflamingo.model.checkpoint",
    "openflamingo.model.convert.openflamingo",
    "openflamingo.model.convert.mpt",
    "openflamingo.model.convert.idefics",
    "openflamingo.data.convert",
    "openflamingo.data.inspection",
    "openflamingo.eval.runner",
    "openflamingo.eval.metrics",
    "openflamingo.train.loop",
    "openflamingo.train.evaluate",
    "transformers.models.llama.modeling_llama",
    "transformers.models.mpt.modeling_mpt",
    "transformers.models.gpt_neox.modeling_gpt_neox",
    "transformers.models.clip.modeling_clip",
)


def _receive(connection: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
    size = int.from_bytes(data[:8], "big")
    while len(data) - 8 < size:
        data += connection.recv(1 << 20)
    return json.loads(data[8:]), fds


def _child(request: dict, fds: list[int]) -> int:
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    argv = request["argv"]
    sys.argv = ["openflamingo", *argv]
    try:
        if request.get("parse_only"):
            from openflamingo.cli import build_parser

            build_parser().parse_args(argv)
            return 0
        from openflamingo.cli import main

        return main(argv)
    except SystemExit as exit:  # argparse's errors and --help
        if isinstance(exit.code, int) or exit.code is None:
            return exit.code or 0
        print(exit.code, file=sys.stderr)
        return 1
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def serve(path: str) -> None:
    import importlib

    for name in WARM_MODULES:
        importlib.import_module(name)
    from openflamingo.cli import build_parser

    build_parser()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)
    print("ready", flush=True)
    while True:
        connection, _ = server.accept()
        request, fds = _receive(connection)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            server.close()
            connection.close()
            code = _child(request, fds)
            # the command's exit handlers (data-loader workers), without the second of interpreter teardown
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        for fd in fds:
            os.close(fd)
        status = None
        while status is None:  # a caller that goes away (a test's timeout) takes its command with it
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(code)
            elif select.select([connection], [], [], 0.1)[0] and not connection.recv(1):
                os.kill(pid, signal.SIGKILL)
                status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        status = status if status >= 0 else 128 - status
        with _ignore_broken_pipe():
            connection.sendall(str(status).encode())
        connection.close()


class _ignore_broken_pipe:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        return kind is not None and issubclass(kind, OSError)


def client(parse_only: bool = False) -> None:
    argv = sys.argv[1:]
    if parse_only:
        assert argv[:1] == ["openflamingo"], "usage: parse-only openflamingo ARGS"
        argv = argv[1:]
    request = json.dumps(
        {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "parse_only": parse_only}
    ).encode()
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.connect(os.environ["OPENFLAMINGO_DOCS_CLI"])
    message = len(request).to_bytes(8, "big") + request
    sent = socket.send_fds(connection, [message], [0, 1, 2])
    connection.sendall(message[sent:])
    reply = b""
    while chunk := connection.recv(16):
        reply += chunk
    sys.exit(int(reply) if reply else 1)


if __name__ == "__main__":
    assert sys.argv[1] == "serve", "usage: python docs_cli.py serve SOCKET"
    serve(sys.argv[2])
