"""A fake Ray actor handle for ClusterBackend tests without Ray (test_cluster_degrade.py,
test_gateway_data_plane.py): its methods answer `.remote(...)` with a coroutine, as Ray's handles
do for an asyncio caller. Ray itself is exercised in tests/integration."""

from __future__ import annotations

from services.common.control import EngineFacts, WorkerInfo
from services.common.messages import DataPlanePeers

FACTS = EngineFacts(max_model_len=256, vocab_size=512, device="cpu", dtype="float32", block_size=4, num_kv_blocks=100)


def fake_info(name: str, stage: str, input_address: str, state_address: str, kv_address: str | None) -> WorkerInfo:
    """A worker's WorkerInfo as its actor would report it (encode workers have no engine)."""
    engine = FACTS if stage != "encode" else None
    return WorkerInfo(
        name=name,
        stage=stage,
        pid=1,
        host_id="h",
        model_dir="m",
        input_address=input_address,
        state_address=state_address,
        kv_address=kv_address,
        engine=engine,
    )


class RemoteMethod:
    def __init__(self, fn):
        self._fn = fn

    def remote(self, *args):
        return self._fn(*args)


class FakeActor:
    """info() answers with the worker's current addresses while `alive`, else raises (a dead actor);
    stats() always raises (no poll); register_peers / unregister_gateway are recorded."""

    def __init__(self, info: WorkerInfo) -> None:
        self.alive = True
        self.worker_info = info
        self.registered: list[DataPlanePeers] = []
        self.unregistered: list[str] = []
        self.info = RemoteMethod(self._info)
        self.stats = RemoteMethod(self._fail)
        self.register_peers = RemoteMethod(self._register)
        self.unregister_gateway = RemoteMethod(self._unregister)

    def _check_alive(self) -> None:
        if not self.alive:
            raise RuntimeError("actor died")

    async def _info(self) -> WorkerInfo:
        self._check_alive()
        return self.worker_info

    async def _fail(self):
        raise RuntimeError("no stats here")

    async def _register(self, peers: DataPlanePeers) -> None:
        self._check_alive()
        self.registered.append(peers)

    async def _unregister(self, reply_address: str) -> None:
        self._check_alive()
        self.unregistered.append(reply_address)
