"""The HTTP server's limits (connection cap, request-head, body and keep-alive timeouts) and the Host
allow-list, over loopback with raw sockets where a client must misbehave."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
import transformers

from services.cli import allowed_hosts_from
from services.gateway.app import create_app
from services.gateway.config import GatewayConfig
from services.gateway.hosts import HostAllowList, default_allowed_hosts, host_name
from tests.unit.test_gateway import MODEL, FakeBackend, counters_are_zero, running_server, wait_until

STALLED_HEAD = (
    b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b'Content-Length: 100\r\n\r\n{"model": '
)  # ... and the rest of the body never comes


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


def _address(base_url: str) -> tuple[str, int]:
    host, port = base_url.removeprefix("http://").split(":")
    return host, int(port)


def _stalled_uploads(base_url: str, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.create_connection(_address(base_url), timeout=10)
        sock.sendall(STALLED_HEAD)
        socks.append(sock)
    return socks


def _read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def _status_line(response: bytes) -> bytes:
    return response.partition(b"\r\n")[0]


# ----------------------------------------------------------------------------------------------
# Connection cap and timeouts


def test_past_the_cap_a_connection_is_refused_fast_and_service_recovers(hf_tokenizer):
    config = GatewayConfig(served_model_name=MODEL, max_connections=3, body_read_timeout_s=1.5, retry_after_s=2)
    app = create_app(config, FakeBackend(hf_tokenizer))
    with running_server(app) as base_url:
        stalled = _stalled_uploads(base_url, 3)
        wait_until(lambda: app.state.connections.num_open == 3)
        start = time.monotonic()
        refused = httpx.get(f"{base_url}/v1/models", timeout=5)
        assert time.monotonic() - start < 1.0
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "2" and refused.headers["connection"] == "close"
        error = refused.json()["error"]
        assert (error["type"], error["code"]) == ("server_error", "service_unavailable")
        assert "3 open connections" in error["message"]
        # the stalled uploads end with 408 within the body timeout, and their slots come back
        for sock in stalled:
            assert _status_line(_read_until_closed(sock)) == b"HTTP/1.1 408 Request Timeout"
            sock.close()
        assert time.monotonic() - start < 1.5 + 1.0
        wait_until(lambda: app.state.connections.num_open == 0)
        served = httpx.post(f"{base_url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1})
        assert served.status_code == 200, served.text
        metrics = httpx.get(f"{base_url}/metrics").text
        assert f'tristage:admission_rejections_total{{model_name="{MODEL}",reason="connections"}} 1.0' in metrics
        assert f'tristage:gateway_open_connections{{model_name="{MODEL}"}} 1.0' in metrics  # the scrape's own
        wait_until(lambda: counters_are_zero(app))


def test_300_stalled_uploads_are_all_closed_within_the_body_timeout(hf_tokenizer):
    body_timeout_s = 1.0
    app = create_app(
        GatewayConfig(served_model_name=MODEL, body_read_timeout_s=body_timeout_s), FakeBackend(hf_tokenizer)
    )
    with running_server(app) as base_url:
        start = time.monotonic()
        stalled = _stalled_uploads(base_url, 300)
        sent_s = time.monotonic() - start
        statuses = set()
        for sock in stalled:
            statuses.add(_status_line(_read_until_closed(sock)))
            sock.close()
        closed_s = time.monotonic() - start
        assert statuses == {b"HTTP/1.1 408 Request Timeout"}
        # each upload's timeout runs from its own start; allow one more second of a busy 2-core machine
        assert closed_s < sent_s + body_timeout_s + 1.0, (sent_s, closed_s)
        wait_until(lambda: app.state.connections.num_open == 0)
        wait_until(lambda: counters_are_zero(app))


def test_a_connection_that_sends_no_complete_request_head_is_closed(hf_tokenizer):
    config = GatewayConfig(served_model_name=MODEL, header_read_timeout_s=0.5, keep_alive_timeout_s=30)
    app = create_app(config, FakeBackend(hf_tokenizer))
    with running_server(app) as base_url:
        silent = socket.create_connection(_address(base_url), timeout=5)
        half = socket.create_connection(_address(base_url), timeout=5)
        half.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line: the head never ends
        kept = socket.create_connection(_address(base_url), timeout=5)
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        response = b""
        while not response.endswith(b'{"status":"ok"}'):
            response += kept.recv(65536)
        assert _status_line(response) == b"HTTP/1.1 200 OK"
        kept.sendall(b"GET /health HTTP/1.1\r\n")  # the next request on the kept-alive connection stalls
        start = time.monotonic()
        for sock in (silent, half, kept):
            assert _read_until_closed(sock) == b""
            sock.close()
        assert time.monotonic() - start < 0.5 + 1.0
        wait_until(lambda: app.state.connections.num_open == 0)


def test_an_idle_keep_alive_connection_is_closed(hf_tokenizer):
    config = GatewayConfig(served_model_name=MODEL, keep_alive_timeout_s=0.3)
    app = create_app(config, FakeBackend(hf_tokenizer))
    with running_server(app) as base_url:
        with socket.create_connection(_address(base_url), timeout=5) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            start = time.monotonic()
            response = _read_until_closed(sock)
            assert _status_line(response) == b"HTTP/1.1 200 OK"
            assert 0.2 < time.monotonic() - start < 1.5
        wait_until(lambda: app.state.connections.num_open == 0)


def test_an_upgrade_request_is_served_as_http_and_gives_its_slot_back(hf_tokenizer):
    app = create_app(GatewayConfig(served_model_name=MODEL), FakeBackend(hf_tokenizer))
    with running_server(app) as base_url:
        with socket.create_connection(_address(base_url), timeout=5) as sock:
            sock.sendall(
                b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n"
                b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            )
            assert _status_line(_read_until_closed(sock)) == b"HTTP/1.1 200 OK"
        wait_until(lambda: app.state.connections.num_open == 0)


def test_a_refused_connection_that_sends_nothing_is_closed(hf_tokenizer):
    config = GatewayConfig(served_model_name=MODEL, max_connections=1, header_read_timeout_s=30)
    app = create_app(config, FakeBackend(hf_tokenizer))
    with running_server(app) as base_url, socket.create_connection(_address(base_url), timeout=5):
        wait_until(lambda: app.state.connections.num_open == 1)
        with socket.create_connection(_address(base_url), timeout=5) as refused:
            start = time.monotonic()
            assert _read_until_closed(refused) == b""
            assert time.monotonic() - start < 2.0  # REFUSAL_HEAD_WAIT_S, not the head timeout


# ----------------------------------------------------------------------------------------------
# Host allow-list


def test_host_names_are_compared_without_port_case_or_brackets():
    assert host_name("API.Example.com:8000") == "api.example.com"
    assert host_name("[::1]:8000") == host_name("[::1]") == host_name("::1") == "::1"
    assert host_name("localhost.") == "localhost"
    allow_list = HostAllowList(("api.example.com", "*.internal", "[::1]"))
    for allowed in ("api.example.com", "API.EXAMPLE.COM:443", "gw.internal", "a.b.internal:8000", "[::1]:8000"):
        assert allow_list.allows(allowed), allowed
    for refused in ("example.com", "internal", "evil.api.example.com", "api.example.com.evil.net", ""):
        assert not allow_list.allows(refused), refused
    assert HostAllowList(("*",)).allows("anything:1")
    with pytest.raises(ValueError):
        HostAllowList(("*example.com",))


def test_default_allowed_hosts_are_the_loopback_names_when_bound_to_loopback():
    assert default_allowed_hosts("127.0.0.1") == ("localhost", "127.0.0.1", "::1")
    assert default_allowed_hosts("::1") == ("localhost", "127.0.0.1", "::1")
    assert default_allowed_hosts("127.0.0.2") == ("localhost", "127.0.0.1", "::1", "127.0.0.2")
    assert default_allowed_hosts("localhost") == ("localhost", "127.0.0.1", "::1")
    for exposed in ("0.0.0.0", "::", "10.1.2.3", "gateway.example.com"):
        assert default_allowed_hosts(exposed) is None, exposed
    assert allowed_hosts_from(None, "0.0.0.0") is None
    assert allowed_hosts_from("a.example.com, b.example.com", "127.0.0.1") == ("a.example.com", "b.example.com")


def test_a_disallowed_host_gets_400_naming_the_host_header(hf_tokenizer):
    config = GatewayConfig(served_model_name=MODEL, allowed_hosts=default_allowed_hosts("127.0.0.1"))
    app = create_app(config, FakeBackend(hf_tokenizer))
    with running_server(app) as base_url:
        port = _address(base_url)[1]
        assert httpx.get(f"{base_url}/v1/models").status_code == 200  # Host: 127.0.0.1:PORT
        for host in (f"localhost:{port}", f"[::1]:{port}"):
            assert httpx.get(f"{base_url}/v1/models", headers={"Host": host}).status_code == 200, host
        rebound = httpx.post(
            f"{base_url}/v1/completions",
            json={"model": MODEL, "prompt": "hi", "max_tokens": 1},
            headers={"Host": f"attacker.example:{port}"},
        )
        assert rebound.status_code == 400
        error = rebound.json()["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_host")
        assert "Host header 'attacker.example:" in error["message"]
        assert httpx.get(f"{base_url}/metrics", headers={"Host": "attacker.example"}).status_code == 400
        assert httpx.get(f"{base_url}/health", headers={"Host": "attacker.example"}).status_code == 200  # probes
        with socket.create_connection(_address(base_url), timeout=5) as sock:  # HTTP/1.0 may omit Host
            sock.sendall(b"GET /v1/models HTTP/1.0\r\n\r\n")
            response = _read_until_closed(sock)
        assert _status_line(response).endswith(b" 400 Bad Request")
        assert json.loads(response.partition(b"\r\n\r\n")[2])["error"]["code"] == "invalid_host"
