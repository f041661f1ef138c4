"""What one client may cost the server: body size (413), body time (408), unfinished headers (closed),
connections (503), embedding work after the client left (stopped). Limits are set small here
(tests.server.hostile.LIMITS) so each is reached quickly."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from tests.embed.conftest import needs_builtin
from tests.server.conftest import chat_body
from tests.server.hostile import EMB, LIMITS, check_4xx, check_whole, hostile_server


@pytest.fixture(scope="module")
def srv(tiny_ckpt, tmp_path_factory):
    with hostile_server(tiny_ckpt, tmp_path_factory.mktemp("limits")) as s:
        yield s


def test_a_declared_body_over_the_limit_is_a_413_unread(srv):
    limit = LIMITS["max_request_bytes"]
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        # only the head is sent: the answer must not wait for the body
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {limit + 1}\r\n\r\n".encode())
        answer = read_answer(sock)
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
    assert '"code":"request_too_large"' in answer.replace(" ", "")
    check_whole(srv)


def read_answer(sock: socket.socket) -> str:
    """One whole HTTP answer (the server closes the connection after it)."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data.decode("latin-1")
        data += chunk


def test_a_streamed_body_over_the_limit_is_a_413(srv):
    limit = LIMITS["max_request_bytes"]

    def chunks():  # no Content-Length: chunked transfer, the size is only known while reading
        for _ in range(limit // 2**20 + 2):
            yield b" " * 2**20
    with srv.http() as h:
        try:
            r = h.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        except httpx.TransportError:  # the server may close before the client finished sending
            pass
        else:
            check_4xx(r, 413, code="request_too_large")
    check_whole(srv)


@pytest.mark.slow  # waits on purpose (timeouts, a slow client, a 5 MB prompt)
def test_a_body_that_stalls_is_a_408(srv):
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"model\":")
        start = time.monotonic()
        head = sock.recv(65536).decode("latin-1")
        waited = time.monotonic() - start
    assert head.startswith("HTTP/1.1 408"), head[:200]
    assert LIMITS["body_timeout_s"] - 0.1 <= waited < LIMITS["body_timeout_s"] + 5
    check_whole(srv)


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


@pytest.mark.slow  # waits on purpose (timeouts, a slow client, a 5 MB prompt)
def test_unfinished_headers_are_cut_off(srv):
    """50 slowloris connections: each sends half a request head and stops; all are closed once the
    header timeout passes, and the server answers others meanwhile."""
    socks = []
    for _ in range(50):
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        socks.append(s)
    check_whole(srv)
    try:
        assert all(_closed_by_server(s, LIMITS["header_timeout_s"] + 5) for s in socks)
    finally:
        for s in socks:
            s.close()


@pytest.mark.slow  # waits on purpose (timeouts, a slow client, a 5 MB prompt)
def test_idle_then_unfinished_second_request_is_cut_off(srv):
    """The timer starts again after each response: a kept-alive connection cannot stall either."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        while len(body) < length:
            body += sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 200") and len(body) == length
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # no blank line: the head never ends
        assert _closed_by_server(sock, LIMITS["header_timeout_s"] + 5)


def test_connections_past_the_limit_get_503(tiny_ckpt, tmp_path):
    with hostile_server(tiny_ckpt, tmp_path, limits={"max_connections": 4}) as s:
        socks = [socket.create_connection(("127.0.0.1", s.port), timeout=10) for _ in range(4)]
        try:
            time.sleep(0.2)
            with socket.create_connection(("127.0.0.1", s.port), timeout=10) as extra:
                extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert extra.recv(65536).startswith(b"HTTP/1.1 503")
        finally:
            for sock in socks:
                sock.close()
        time.sleep(0.2)
        check_whole(s)


@pytest.mark.slow  # waits on purpose (timeouts, a slow client, a 5 MB prompt)
@needs_builtin
def test_embedding_work_stops_when_the_client_leaves(srv, monkeypatch):
    """A 64-input request made slow (0.2 s a batch of one): the client leaves after ~1 s; the model
    must stop within a batch or two instead of computing all 64."""
    model = srv.state.embeddings.model
    calls = []
    forward = model._forward

    def slow_forward(batch):
        calls.append(time.monotonic())
        time.sleep(0.2)
        return forward(batch)
    monkeypatch.setattr(model, "_forward", slow_forward)
    monkeypatch.setattr("keel.embed.model.MAX_BATCH", 1)
    body = {"model": EMB, "input": [f"text number {i}" for i in range(LIMITS["max_embedding_inputs"])]}
    with srv.http(timeout=1.0) as h, pytest.raises(httpx.ReadTimeout):
        h.post("/v1/embeddings", json=body)
    left = time.monotonic()
    time.sleep(1.5)
    assert 0 < len(calls) < 20, len(calls)
    assert sum(t > left + 0.6 for t in calls) == 0, "the model kept computing after the client left"
    monkeypatch.undo()
    with srv.http() as h:
        r = h.post("/v1/embeddings", json={"model": EMB, "input": "one word"})
        assert r.status_code == 200
    check_whole(srv)


def test_concurrent_hostile_traffic_leaves_no_blocks_held(srv):
    """Slow-body clients, oversized bodies and good requests at once; then nothing is left held."""
    def bad():
        try:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
                sock.recv(1024)
        except OSError:
            pass
    threads = [threading.Thread(target=bad) for _ in range(10)]
    for t in threads:
        t.start()
    with srv.http() as h:
        for _ in range(5):
            assert h.post("/v1/chat/completions", json=chat_body()).status_code == 200
    for t in threads:
        t.join()
    srv.wait_idle()
