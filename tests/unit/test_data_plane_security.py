"""Authenticated ZeroMQ between cluster members (services.common.security): keys from the cluster secret,
CURVE servers that admit only the cluster's client key, and where the secret comes from. Real sockets
over loopback."""

from __future__ import annotations

import contextlib
import pickle
import time

import pytest
import zmq
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from services.common.channels import bind, configure, connect
from services.common.security import (
    CLIENT_KEY_LABEL,
    CLUSTER_SECRET_ENV,
    SERVER_KEY_LABEL,
    ClusterSecret,
    ClusterSecretMissing,
    CurveKeys,
    ZapAuthenticator,
    auth_required,
    derive_keys,
    hkdf_sha256,
    is_loopback,
    load_cluster_secret,
    resolve_cluster_secret,
)

SECRET = ClusterSecret(b"a cluster secret of enough bytes")
OTHER = ClusterSecret(b"another cluster's secret, as long")
HANDSHAKE_WAIT_MS = 1500  # loopback handshakes take well under a millisecond


# ----------------------------------------------------------------------------------------------
# Keys


def test_keys_are_deterministic_and_each_label_gives_its_own_key_pair():
    keys = derive_keys(SECRET)
    assert derive_keys(ClusterSecret(SECRET.value)) == keys  # any member derives the same keys
    assert keys.server_secret != keys.client_secret and keys.server_public != keys.client_public
    assert z85.decode(keys.server_secret) == hkdf_sha256(SECRET.value, SERVER_KEY_LABEL)
    assert z85.decode(keys.client_secret) == hkdf_sha256(SECRET.value, CLIENT_KEY_LABEL)
    assert keys.server_public == zmq.curve_public(keys.server_secret)
    assert keys.client_public == zmq.curve_public(keys.client_secret)
    assert all(len(k) == 40 for k in (keys.server_public, keys.server_secret, keys.client_public))
    other = derive_keys(OTHER)
    assert {other.server_public, other.client_public}.isdisjoint({keys.server_public, keys.client_public})


def test_the_secret_never_shows_in_a_repr_and_survives_pickling():
    assert SECRET.value.decode() not in repr(SECRET)
    keys = derive_keys(SECRET)
    assert keys.server_secret.decode() not in repr(keys) and keys.client_secret.decode() not in repr(keys)
    assert pickle.loads(pickle.dumps(SECRET)) == SECRET  # Ray pickles it into the actor's constructor call


def test_a_short_secret_is_refused():
    with pytest.raises(ValueError, match="at least 16"):
        ClusterSecret(b"short")


# ----------------------------------------------------------------------------------------------
# Where the secret comes from


@pytest.mark.parametrize(
    "host, expected", [("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("localhost", True)]
)
def test_loopback_hosts(host, expected):
    assert is_loopback(host) is expected


@pytest.mark.parametrize("host", ["10.0.0.5", "0.0.0.0", "auto", "ray-head", "192.168.1.2"])
def test_other_hosts_are_not_loopback(host):
    assert not is_loopback(host)


def test_auto_means_on_beyond_loopback():
    assert not auth_required("auto", "127.0.0.1")
    assert auth_required("auto", "10.0.0.5") and auth_required("auto", "auto")
    assert auth_required("on", "127.0.0.1")
    assert not auth_required("off", "10.0.0.5")
    with pytest.raises(ValueError):
        auth_required("maybe", "127.0.0.1")  # type: ignore[arg-type]


def test_the_secret_given_wins_a_run_of_its_own_makes_one_a_joining_run_without_one_refuses():
    assert resolve_cluster_secret("auto", "127.0.0.1", SECRET, joining=False) is None  # off: unused
    assert resolve_cluster_secret("on", "127.0.0.1", SECRET, joining=True) is SECRET
    made = resolve_cluster_secret("on", "127.0.0.1", None, joining=False)
    assert made is not None and made != resolve_cluster_secret("on", "127.0.0.1", None, joining=False)
    with pytest.raises(ClusterSecretMissing, match=CLUSTER_SECRET_ENV):
        resolve_cluster_secret("auto", "auto", None, joining=True)
    assert resolve_cluster_secret("off", "auto", None, joining=True) is None


def test_secret_from_the_environment_or_a_file(tmp_path):
    assert load_cluster_secret({}) is None
    assert load_cluster_secret({CLUSTER_SECRET_ENV: ""}) is None
    assert load_cluster_secret({CLUSTER_SECRET_ENV: SECRET.value.decode()}) == SECRET
    path = tmp_path / "secret"
    path.write_bytes(OTHER.value + b"\n")
    assert load_cluster_secret({CLUSTER_SECRET_ENV: SECRET.value.decode()}, str(path)) == OTHER
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_cluster_secret({}, str(path))


# ----------------------------------------------------------------------------------------------
# CURVE servers admit only the cluster's client key


@pytest.fixture
def curve_server():
    """A PULL socket bound as a CURVE server with SECRET's keys, its context's ZAP handler running."""
    context = zmq.Context()
    keys = derive_keys(SECRET)
    authenticator = ZapAuthenticator(context, keys, "test-server")
    server = configure(context.socket(zmq.PULL))
    address = bind(server, "tcp://127.0.0.1:0", keys)
    yield context, server, address, authenticator
    server.close(linger=0)
    authenticator.close()
    context.term()


def _push(context: zmq.Context, address: str, keys: CurveKeys | None, *, server_public: bytes | None = None):
    """A PUSH socket connected to `address` (a CURVE client with `keys`), and its handshake monitor."""
    socket = configure(context.socket(zmq.PUSH))
    if server_public is not None:  # a client that expects another server key
        socket.setsockopt(zmq.CURVE_SERVERKEY, server_public)
        socket.setsockopt(zmq.CURVE_PUBLICKEY, keys.client_public)
        socket.setsockopt(zmq.CURVE_SECRETKEY, keys.client_secret)
        keys = None
    monitor = socket.get_monitor_socket(
        zmq.EVENT_HANDSHAKE_SUCCEEDED
        | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    )
    connect(socket, address, keys)
    return socket, monitor


def _first_handshake_event(monitor: zmq.Socket) -> int:
    assert monitor.poll(HANDSHAKE_WAIT_MS), "no handshake event"
    return parse_monitor_message(monitor.recv_multipart())["event"]


def _try_send(socket: zmq.Socket) -> None:
    """Send without waiting: a PUSH socket whose handshake failed has no peer, so the send has nowhere to go."""
    with contextlib.suppress(zmq.Again):
        socket.send(b"forged", flags=zmq.NOBLOCK)


def _close(socket: zmq.Socket, monitor: zmq.Socket) -> None:
    socket.disable_monitor()
    monitor.close(linger=0)
    socket.close(linger=0)


def test_the_cluster_client_key_is_admitted(curve_server):
    context, server, address, authenticator = curve_server
    socket, monitor = _push(context, address, derive_keys(SECRET))
    try:
        assert _first_handshake_event(monitor) == zmq.EVENT_HANDSHAKE_SUCCEEDED
        socket.send(b"hello")
        assert server.poll(HANDSHAKE_WAIT_MS) and server.recv() == b"hello"
        assert authenticator.num_refused == 0
    finally:
        _close(socket, monitor)


def test_a_client_with_another_key_is_refused_by_the_zap_handler(curve_server):
    context, server, address, authenticator = curve_server
    stranger = derive_keys(OTHER)
    # it even knows the server's public key: only its own client key is wrong
    socket, monitor = _push(context, address, stranger, server_public=derive_keys(SECRET).server_public)
    try:
        assert _first_handshake_event(monitor) == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        _try_send(socket)
        assert not server.poll(300)
        assert authenticator.num_refused >= 1
    finally:
        _close(socket, monitor)


def test_a_client_of_another_cluster_fails_the_handshake(curve_server):
    context, server, address, _ = curve_server
    socket, monitor = _push(context, address, derive_keys(OTHER))  # another server key altogether
    try:
        assert _first_handshake_event(monitor) == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        _try_send(socket)
        assert not server.poll(300)
    finally:
        _close(socket, monitor)


def test_a_plain_client_is_refused(curve_server):
    context, server, address, _ = curve_server
    socket, monitor = _push(context, address, None)
    try:
        assert _first_handshake_event(monitor) == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        _try_send(socket)
        assert not server.poll(300)
    finally:
        _close(socket, monitor)


def test_without_a_zap_handler_a_server_refuses_even_the_right_key():
    """Fail closed: libzmq admits any key when no handler runs, unless the domain is enforced (it is)."""
    context = zmq.Context()
    keys = derive_keys(SECRET)
    server = configure(context.socket(zmq.PULL))
    address = bind(server, "tcp://127.0.0.1:0", keys)
    socket, monitor = _push(context, address, keys)
    try:
        assert _first_handshake_event(monitor) != zmq.EVENT_HANDSHAKE_SUCCEEDED
        _try_send(socket)
        assert not server.poll(300)
    finally:
        _close(socket, monitor)
        server.close(linger=0)
        context.term()


def test_the_zap_handler_stops_promptly():
    context = zmq.Context()
    authenticator = ZapAuthenticator(context, derive_keys(SECRET), "t")
    start = time.monotonic()
    authenticator.close()
    assert time.monotonic() - start < 1.0
    context.term()
