"""Image URLs a client sends reach only what the operator allows, cost a bounded time and size, and fail with one
message that tells the client nothing about the server's network; local files are read only if regular."""

from __future__ import annotations

import base64
import http.server
import io
import ipaddress
import logging
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from openflamingo.serve.errors import ApiError
from openflamingo.serve.images import MAX_REDIRECTS, ImagePolicy, _allowed, read_image

LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"),)
TRUSTING = ImagePolicy(allow_urls=True, trusted_networks=LOOPBACK, url_timeout_s=5)
CANNOT_FETCH = "part: cannot fetch image URL"


def png(size=(40, 30), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 0, 0)).save(buffer, fmt)
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.requests.append(self.path)
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_error(404)
        else:
            route(self)

    def log_message(self, *args):
        pass


@contextmanager
def web_server(host: str = "127.0.0.1", tls: ssl.SSLContext | None = None, **routes: Callable) -> Iterator:
    """A local server answering GET /NAME with routes[NAME](handler); yields (base URL, server)."""
    with http.server.ThreadingHTTPServer((host, 0), Handler) as server:
        server.routes = {f"/{name}": route for name, route in routes.items()}
        server.requests = []
        if tls is not None:
            server.socket = tls.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        try:
            yield f"{'https' if tls else 'http'}://{host}:{server.server_address[1]}", server
        finally:
            server.shutdown()


def image(data: bytes) -> Callable:
    def send(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    return send


def redirect(location: str) -> Callable:
    def send(handler):
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return send


def drip(response: bytes, prefix: int = 0) -> Callable:
    """Send the first `prefix` bytes at once, then one byte every 0.2 s."""

    def send(handler):
        try:
            handler.wfile.write(response[:prefix])
            for i in range(prefix, len(response)):
                time.sleep(0.2)
                handler.wfile.write(response[i : i + 1])
        except OSError:
            pass  # the client hung up

    return send


def refused(url: str, policy: ImagePolicy) -> ApiError:
    with pytest.raises(ApiError) as error:
        read_image(url, "part", policy)
    assert error.value.param == "part" and error.value.status == 400
    return error.value


def test_request_images_are_decoded_with_the_policy_limits():
    jpeg = data_url(png((1000, 800), "JPEG"))
    assert read_image(jpeg, "part", ImagePolicy()).size == (1000, 800)
    assert read_image(jpeg, "part", ImagePolicy(draft_size=224)).size == (500, 400)  # 1/4: 200 < 224
    thin = refused(data_url(png((400, 10))), ImagePolicy())
    assert thin.code == "image_aspect_ratio" and thin.message.startswith("part: image is 400x10")
    assert thin.message.endswith("(--max-image-aspect-ratio)")
    assert read_image(data_url(png((400, 10))), "part", ImagePolicy(max_aspect_ratio=40)).size == (400, 10)
    huge = refused(data_url(png((100, 101))), ImagePolicy(max_pixels=10_000))
    assert (
        huge.code == "image_too_large"
        and "10100 pixels" in huge.message
        and "--max-image-pixels" in huge.message
    )


def test_loopback_is_refused_unless_trusted(caplog):
    with web_server(**{"red.png": image(png())}) as (base, _):
        with caplog.at_level(logging.INFO, logger="openflamingo.serve"):
            error = refused(f"{base}/red.png", ImagePolicy(allow_urls=True))
        assert error.message == CANNOT_FETCH and error.code == "invalid_image"
        assert "not publicly routable nor trusted" in caplog.text  # the detail is for the operator only
        assert read_image(f"{base}/red.png", "part", TRUSTING).size == (40, 30)
        port = base.rsplit(":", 1)[1]
        assert refused(f"http://[::ffff:127.0.0.1]:{port}/red.png", ImagePolicy(allow_urls=True)).message == (
            CANNOT_FETCH
        )


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.2",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "::7f00:1",  # IPv4-compatible
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "2002:a00:1::1",  # 6to4 of 10.0.0.1
    ],
)
def test_addresses_that_are_not_publicly_routable_are_refused(address):
    assert not _allowed(ipaddress.ip_address(address), ())


def test_public_and_trusted_addresses_are_allowed():
    for address in ("93.184.215.14", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8", "2002:808:808::1"):
        assert _allowed(ipaddress.ip_address(address), ()), address
    trusted = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
    for address in ("10.9.8.7", "::ffff:10.9.8.7", "fd12::1"):
        assert _allowed(ipaddress.ip_address(address), trusted), address


def test_every_redirect_is_checked_again(caplog):
    with (
        web_server("127.0.0.2", **{"red.png": image(png())}) as (other, _),
        web_server(**{"red.png": image(png())}) as (base, server),
    ):
        server.routes |= {
            "/hop": redirect("/red.png"),
            "/other": redirect(f"{other}/red.png"),
            "/ftp": redirect("ftp://127.0.0.1/red.png"),
            "/file": redirect("file:///etc/passwd"),
            "/loop": redirect("/loop"),
        }
        assert read_image(f"{base}/hop", "part", TRUSTING).size == (40, 30)
        with caplog.at_level(logging.INFO, logger="openflamingo.serve"):
            for path in ("other", "ftp", "file", "loop"):
                assert refused(f"{base}/{path}", TRUSTING).message == CANNOT_FETCH, path
        assert server.requests.count("/loop") == MAX_REDIRECTS + 1
        assert "127.0.0.2: not publicly routable" in caplog.text and "ftp://" in caplog.text
        # what refused 127.0.0.2 was the address check: trusted, it is fetched
        wider = replace(TRUSTING, trusted_networks=(ipaddress.ip_network("127.0.0.0/8"),))
        assert read_image(f"{base}/other", "part", wider).size == (40, 30)


def test_a_dripping_server_is_cut_at_the_deadline():
    body = png()
    response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    routes = {"head": drip(response), "body": drip(response, prefix=response.index(b"\r\n\r\n") + 4)}
    with web_server(**routes) as (base, _):
        for path in routes:
            start = time.monotonic()
            error = refused(f"{base}/{path}", replace(TRUSTING, url_timeout_s=1.0))
            elapsed = time.monotonic() - start
            assert error.message == CANNOT_FETCH and 0.9 < elapsed < 1.8, (path, elapsed)


def test_the_byte_limit_holds_while_streaming_and_for_a_declared_length():
    def endless(handler):
        handler.send_response(200)
        handler.send_header("Connection", "close")  # no length: the body runs until the server closes
        handler.end_headers()
        try:
            for _ in range(1000):
                handler.wfile.write(b"\0" * 65536)
        except OSError:
            pass

    def declared(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(10**12))
        handler.end_headers()
        time.sleep(3)

    with web_server(endless=endless, declared=declared) as (base, _):
        for path in ("endless", "declared"):
            start = time.monotonic()
            error = refused(f"{base}/{path}", replace(TRUSTING, max_bytes=100_000))
            assert error.code == "image_too_large" and time.monotonic() - start < 1.0, path


def test_failures_look_the_same_to_the_client(caplog):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]
    with web_server(**{"text.png": image(b"<html>not an image</html>")}) as (base, _):
        messages = {
            refused(f"{base}/red.png", ImagePolicy(allow_urls=True)).message,  # not allowed
            refused(f"http://127.0.0.1:{closed_port}/red.png", TRUSTING).message,  # nothing listens
            refused(f"{base}/missing.png", TRUSTING).message,  # 404
        }
        assert messages == {CANNOT_FETCH}
        assert refused(f"{base}/text.png", TRUSTING).code == "invalid_image"  # fetched, but not an image


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_https_verifies_the_certificate_for_the_url_host_name(tmp_path, monkeypatch):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"]
        + ["-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(cert, key)
    names = []
    server_side.sni_callback = lambda sock, name, context: names.append(name)
    default_context = ssl.create_default_context
    with web_server(tls=server_side, **{"red.png": image(png())}) as (base, _):
        port = base.rsplit(":", 1)[1]
        # not trusted by the system's CAs: refused
        assert refused(f"https://localhost:{port}/red.png", TRUSTING).message == CANNOT_FETCH
        monkeypatch.setattr(ssl, "create_default_context", lambda: default_context(cafile=str(cert)))
        assert read_image(f"https://localhost:{port}/red.png", "part", TRUSTING).size == (40, 30)
        assert names[-1] == "localhost"  # SNI names the host, though the connection went to a checked address
        # the certificate is for localhost, not for the address it was reached at
        assert refused(f"https://127.0.0.1:{port}/red.png", TRUSTING).message == CANNOT_FETCH


def test_a_fifo_in_the_image_directory_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")  # opening it for reading would wait for a writer
    (tmp_path / "ok.png").write_bytes(png())
    policy = ImagePolicy(local_dir=tmp_path)
    outcome = []
    reader = threading.Thread(
        target=lambda: outcome.append(refused(f"file://{tmp_path}/pipe.png", policy)), daemon=True
    )
    reader.start()
    reader.join(timeout=5)
    assert not reader.is_alive() and "is not a regular file" in outcome[0].message
    assert outcome[0].code == "invalid_image"
    assert read_image(f"file://{tmp_path}/ok.png", "part", policy).size == (40, 30)
    assert refused(f"file://{tmp_path}/ok.png", replace(policy, max_bytes=50)).code == "image_too_large"
    assert refused(f"file://{Path(tmp_path)}", policy).code == "invalid_image"  # the directory itself
