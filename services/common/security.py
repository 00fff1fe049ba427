"""Authenticated ZeroMQ between cluster members: CURVE keys derived from one cluster secret, and a ZAP
handler that admits only the cluster's client key.

    cluster secret ──HKDF-SHA256, label SERVER_KEY_LABEL──▶ server secret key ──curve_public──▶ server public key
                   └─HKDF-SHA256, label CLIENT_KEY_LABEL──▶ client secret key ──curve_public──▶ client public key

Every member that knows the secret derives the same two key pairs, so each one can serve and connect;
there are no key files to hand out. The binding side of every data-plane socket pair is the CURVE
server (server secret key); the connecting side is a CURVE client that presents the client key pair
and expects the server public key:

    binds (server)                          connects (client)
    worker input PULL                       gateway PUSH; prefill PUSH of KV acks (decode -> prefill)
    gateway results PULL                    worker PUSH of OutputBatch
    worker state PUB                        gateway SUB
    decode KV PULL                          prefill PUSH (KVTransfer, KVLayers)
    prefill embedding PULL                  encoder PUSH (ImageEmbedding)

A peer gets through only if it (1) knows the server public key: otherwise the server cannot open its
HELLO and the handshake fails before any message, and (2) presents the cluster's client public key:
the ZAP handler (one thread per ZeroMQ context, `ZapAuthenticator`) refuses any other key, and a
plain (NULL mechanism) peer fails the mechanism check. Every server socket enforces its ZAP domain,
so a context without a running handler refuses every client instead of admitting any key (libzmq's
behaviour when no handler is bound).

When authentication is on (`auth_required`): `--data-plane-auth on`, or `auto` (the default) with a
data-plane address that is not loopback (127.0.0.0/8, ::1, localhost; "auto" resolves to the node's
address, so it counts as not loopback). Where the secret comes from: `load_cluster_secret` (the
TRISTAGE_CLUSTER_SECRET variable or a file), else `resolve_cluster_secret` makes a random one for a
run that starts its own Ray, and refuses to go on for one that joins a cluster. The secret never
appears in a repr or a log line.

No torch: every process may import this module.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import zmq
from zmq.utils import z85

logger = logging.getLogger(__name__)

CLUSTER_SECRET_ENV = "TRISTAGE_CLUSTER_SECRET"
MIN_SECRET_BYTES = 16  # a secret shorter than this is refused (`openssl rand -hex 32` gives 64)
GENERATED_SECRET_BYTES = 32
DataPlaneAuth = Literal["auto", "on", "off"]
DATA_PLANE_AUTH_MODES: tuple[DataPlaneAuth, ...] = ("auto", "on", "off")

# HKDF (RFC 5869) parameters: a fixed salt names the scheme, a label per key pair keeps them apart
HKDF_SALT = b"tristage cluster secret v1"
SERVER_KEY_LABEL = b"tristage/zmq-curve/server"
CLIENT_KEY_LABEL = b"tristage/zmq-curve/client"
CURVE_KEY_BYTES = 32

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by the ZAP specification (RFC 27)
ZAP_DOMAIN = b"tristage"
ZAP_POLL_MS = 100  # how often the handler thread checks for shutdown
MAX_WARNED_PEERS = 256  # peers whose refusal was logged (each is logged once; the count goes on)

SocketT = TypeVar("SocketT", bound=zmq.Socket[object])  # a blocking or an asyncio socket


class ClusterSecretMissing(ValueError):
    """Authentication is on, no secret was given, and this process may not make one up."""


@dataclass(frozen=True)
class ClusterSecret:
    """The one secret every member of a cluster shares. Its repr hides the value (it travels to actors as
    a constructor argument, and Ray may print those)."""

    value: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.value) < MIN_SECRET_BYTES:
            raise ValueError(f"the cluster secret has {len(self.value)} bytes; it needs at least {MIN_SECRET_BYTES}")

    @classmethod
    def generate(cls) -> ClusterSecret:
        return cls(secrets.token_bytes(GENERATED_SECRET_BYTES))


def load_cluster_secret(environ: Mapping[str, str], secret_file: str | None = None) -> ClusterSecret | None:
    """The secret from `secret_file` (its bytes, a trailing newline dropped) or else the
    TRISTAGE_CLUSTER_SECRET variable; None when neither is given. An empty value counts as not given."""
    if secret_file is not None:
        value = Path(secret_file).read_bytes().rstrip(b"\r\n")
        if not value:
            raise ValueError(f"the cluster secret file {secret_file} is empty")
        return ClusterSecret(value)
    value_str = environ.get(CLUSTER_SECRET_ENV, "")
    return ClusterSecret(value_str.encode()) if value_str else None


def is_loopback(host: str) -> bool:
    """Whether `host` (a bind address) is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name, or "auto": another host may reach it
        return False


def auth_required(mode: DataPlaneAuth, bind_host: str) -> bool:
    if mode not in DATA_PLANE_AUTH_MODES:
        raise ValueError(f"--data-plane-auth must be one of {DATA_PLANE_AUTH_MODES}, not {mode!r}")
    return mode == "on" or (mode == "auto" and not is_loopback(bind_host))


def resolve_cluster_secret(
    mode: DataPlaneAuth, bind_host: str, given: ClusterSecret | None, *, joining: bool
) -> ClusterSecret | None:
    """The secret this run's data plane uses, or None when authentication is off.

    A run that starts its own Ray creates every member itself, so a random secret for the run does;
    a run that joins a cluster (`joining`) meets members started elsewhere, which must share the
    operator's secret: without one it refuses to start."""
    if not auth_required(mode, bind_host):
        return None
    if given is not None:
        return given
    if joining:
        raise ClusterSecretMissing(
            f"data-plane authentication is on (--data-plane-auth {mode}, data-plane host {bind_host}) and no "
            f"cluster secret was given: set {CLUSTER_SECRET_ENV} (or --cluster-secret-file) to the same value on "
            "every gateway of the cluster, or pass --data-plane-auth off on a trusted network"
        )
    return ClusterSecret.generate()


# ----------------------------------------------------------------------------------------------
# Keys


@dataclass(frozen=True)
class CurveKeys:
    """The cluster's two CURVE key pairs, Z85-encoded as libzmq's socket options take them."""

    server_public: bytes
    server_secret: bytes = field(repr=False)
    client_public: bytes
    client_secret: bytes = field(repr=False)


def hkdf_sha256(secret: bytes, label: bytes, num_bytes: int = CURVE_KEY_BYTES) -> bytes:
    """HKDF-SHA256 (RFC 5869) of `secret` with the scheme's salt, for the key named by `label`."""
    if num_bytes > hashlib.sha256().digest_size:  # one expand block is all the keys need
        raise ValueError(f"at most {hashlib.sha256().digest_size} bytes per label")
    pseudo_random_key = hmac.new(HKDF_SALT, secret, hashlib.sha256).digest()
    return hmac.new(pseudo_random_key, label + b"\x01", hashlib.sha256).digest()[:num_bytes]


def derive_keys(secret: ClusterSecret) -> CurveKeys:
    """The same keys on every member that knows `secret`."""
    server_secret = z85.encode(hkdf_sha256(secret.value, SERVER_KEY_LABEL))
    client_secret = z85.encode(hkdf_sha256(secret.value, CLIENT_KEY_LABEL))
    return CurveKeys(
        server_public=zmq.curve_public(server_secret),
        server_secret=server_secret,
        client_public=zmq.curve_public(client_secret),
        client_secret=client_secret,
    )


def curve_server(socket: SocketT, keys: CurveKeys | None) -> SocketT:
    """Make `socket` (before it binds) a CURVE server whose clients the ZAP handler vets; None: plain."""
    if keys is not None:
        socket.setsockopt(zmq.CURVE_SERVER, 1)
        socket.setsockopt(zmq.CURVE_SECRETKEY, keys.server_secret)
        socket.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        socket.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no handler running: refuse, never admit any key
    return socket


def curve_client(socket: SocketT, keys: CurveKeys | None) -> SocketT:
    """Make `socket` (before it connects) a CURVE client with the cluster's keys; None: plain."""
    if keys is not None:
        socket.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
        socket.setsockopt(zmq.CURVE_PUBLICKEY, keys.client_public)
        socket.setsockopt(zmq.CURVE_SECRETKEY, keys.client_secret)
    return socket


# ----------------------------------------------------------------------------------------------
# The ZAP handler


class ZapAuthenticator:
    """One ZeroMQ context's ZAP handler (RFC 27): admits a CURVE client presenting the cluster's client
    public key, refuses everything else. Start it before the context's server sockets bind.

    A thread of its own answers libzmq's requests (they arrive during handshakes, on libzmq's I/O
    threads' behalf, so they must never wait behind a worker loop or an asyncio loop). It uses a
    blocking shadow of the context, so an asyncio context works too. `num_refused` counts refusals;
    the first refusal of each peer address is logged with the likely cause.
    """

    def __init__(self, context: zmq.Context[Any], keys: CurveKeys, owner: str) -> None:
        self.owner = owner
        self.num_refused = 0
        self._client_public = z85.decode(keys.client_public)  # ZAP hands over the raw 32 bytes
        self._stop = threading.Event()
        self._warned: set[bytes] = set()
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.shadow(context.underlying)
        self._socket = self._context.socket(zmq.REP)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(ZAP_ENDPOINT)  # bound here, so no handshake can come before the handler
        self._thread = threading.Thread(target=self._run, name=f"{owner}-zap", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop answering (before the context terminates: the socket must close first)."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self._socket.poll(ZAP_POLL_MS):
                    self._socket.send_multipart(self._answer(self._socket.recv_multipart()))
        finally:
            self._socket.close(linger=0)

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        """[version, request id, status code, status text, user id, metadata] for one ZAP request
        [version, request id, domain, address, identity, mechanism, credentials...]."""
        if len(frames) < 6:
            return [b"1.0", frames[1] if len(frames) > 1 else b"", b"400", b"malformed ZAP request", b"", b""]
        version, request_id, domain, address, _identity, mechanism = frames[:6]
        credentials = frames[6:]
        if domain == ZAP_DOMAIN and mechanism == b"CURVE" and credentials and credentials[0] == self._client_public:
            return [version, request_id, b"200", b"OK", b"cluster", b""]
        self._refused(address, mechanism)
        return [version, request_id, b"400", b"not a member of this cluster", b"", b""]

    def _refused(self, address: bytes, mechanism: bytes) -> None:
        self.num_refused += 1
        if address in self._warned or len(self._warned) >= MAX_WARNED_PEERS:
            return
        self._warned.add(address)
        logger.warning(
            "%s refused a data-plane connection from %s (%s, not this cluster's client key): a member with "
            "another %s, or not a member at all",
            self.owner,
            address.decode(errors="replace") or "?",
            mechanism.decode(errors="replace"),
            CLUSTER_SECRET_ENV,
        )


def start_authenticator(context: zmq.Context[Any], keys: CurveKeys | None, owner: str) -> ZapAuthenticator | None:
    """The context's ZAP handler when authentication is on (None: plain sockets, nothing to run)."""
    return ZapAuthenticator(context, keys, owner) if keys is not None else None
