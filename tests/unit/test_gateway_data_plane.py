"""ClusterBackend's side of data-plane trust: it registers its results address and every worker's addresses
with each worker over Ray (again when a worker comes back with new ones), withdraws them on close, and a
worker whose sockets refuse its CURVE handshake (another cluster secret) is avoided and named in the log.

Real ZeroMQ over loopback, no Ray: each worker's actor is a fake that records the calls."""

from __future__ import annotations

import asyncio
import logging

import zmq
import zmq.asyncio

from services.common.channels import bind, configure, tcp_address
from services.common.messages import DataPlanePeers
from services.common.security import ClusterSecret, ZapAuthenticator, derive_keys
from services.gateway.cluster import ClusterBackend
from services.workers.pool import WorkerHandle
from tests.unit.cluster_fakes import FakeActor, fake_info

SECRET = ClusterSecret(b"the gateway's cluster secret....")


def fake_worker(name: str, stage: str, port: int, state_address: str | None = None) -> WorkerHandle:
    info = fake_info(
        name,
        stage,
        tcp_address(port=port),  # nobody listens: the gateway's PUSH connects lazily
        state_address or tcp_address(port=port + 1),
        tcp_address(port=port + 2) if stage == "decode" else None,
    )
    return WorkerHandle(name, stage, FakeActor(info), info)


def _link(backend: ClusterBackend, name: str):
    return next(link for link in backend._links if link.handle.name == name)


def test_every_worker_learns_the_gateway_and_its_peers_and_again_after_a_restart():
    async def scenario():
        prefill, decode = fake_worker("prefill-0", "prefill", 41000), fake_worker("decode-0", "decode", 41010)
        backend = ClusterBackend([prefill, decode], model_name="m", tokenizer=None, health_interval_s=3600)
        await backend.start()
        try:
            expected = DataPlanePeers(
                reply_address=backend.reply_to,
                input_addresses=[tcp_address(port=41000), tcp_address(port=41010)],
                kv_addresses=[tcp_address(port=41012)],
            )
            assert prefill.actor.registered == decode.actor.registered == [expected]

            # Ray restarted the prefill worker: a new process at new addresses. Both workers hear of it (the
            # decode worker acks to the new address) before any request is sent there.
            restarted = fake_worker("prefill-0", "prefill", 42000).info
            prefill.actor.worker_info = restarted
            await backend._check(_link(backend, "prefill-0"))
            moved = DataPlanePeers(
                reply_address=backend.reply_to,
                input_addresses=[tcp_address(port=42000), tcp_address(port=41010)],
                kv_addresses=[tcp_address(port=41012)],
            )
            assert prefill.actor.registered[-1] == decode.actor.registered[-1] == moved
            num_calls = len(decode.actor.registered)
            await backend._check(_link(backend, "decode-0"))  # up to date: no call
            assert len(decode.actor.registered) == num_calls
        finally:
            await backend.close()
        assert prefill.actor.unregistered == decode.actor.unregistered == [backend.reply_to]

    asyncio.run(scenario())


def test_a_worker_with_another_cluster_secret_is_avoided_and_the_cause_logged(caplog):
    """The worker's state socket is a CURVE server with another secret's keys: the gateway's handshake fails."""

    async def scenario():
        context = zmq.Context()
        other_keys = derive_keys(ClusterSecret(b"a different cluster's secret...."))
        authenticator = ZapAuthenticator(context, other_keys, "worker")
        state = configure(context.socket(zmq.PUB))
        state_address = bind(state, tcp_address(), other_keys)
        prefill = fake_worker("prefill-0", "prefill", 43000, state_address=state_address)
        decode = fake_worker("decode-0", "decode", 43010)
        backend = ClusterBackend(
            [prefill, decode], model_name="m", tokenizer=None, health_interval_s=3600, cluster_secret=SECRET
        )
        await backend.start()
        try:
            link = _link(backend, "prefill-0")
            for _ in range(100):
                if link.handshake_refused:
                    break
                await asyncio.sleep(0.05)
            assert link.handshake_refused and link.unreachable and not link.quiet
            backend._suspend_quiet_workers()
            assert backend.router.suspended == {"prefill-0"}
            assert any("TRISTAGE_CLUSTER_SECRET" in r.message and "prefill-0" in r.message for r in caplog.records)
        finally:
            await backend.close()
            state.close(linger=0)
            authenticator.close()
            context.term()

    with caplog.at_level(logging.WARNING):
        asyncio.run(scenario())
