"""Hugging Face Hub ids as models (services/engine/models/hub.py), offline: a Hub cache laid out by the test
(`models--org--name/{refs,snapshots}`, as huggingface_hub writes it) holding a tiny model, or a fake HubClient
that counts what it downloads. Nothing here reaches the network."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from services import serve
from services.cli import build_parser, engine_config_from_args, main
from services.engine import EngineConfig
from services.engine.llm import LLM
from services.engine.models.hub import (
    LOCK_DIR,
    HubSettings,
    ModelResolutionError,
    local_model_dir,
    model_source,
    resolve_model,
    resolve_tokenizer,
)

MAIN_COMMIT = "a" * 40
V2_COMMIT = "b" * 40


def _snapshot(cache_dir: Path, repo_id: str, commit: str, source_dir: Path, refs: Sequence[str] = ()) -> Path:
    """`source_dir`'s files as the snapshot `commit` of `repo_id`, with `refs` (branch names) pointing at it."""
    repo_dir = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot_dir = repo_dir / "snapshots" / commit
    shutil.copytree(source_dir, snapshot_dir)
    for ref in refs:
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return snapshot_dir


def _variant(model_dir: str, tmp_path: Path, name: str, **config_changes) -> Path:
    """A copy of `model_dir` with config.json's fields changed."""
    target = tmp_path / name
    shutil.copytree(model_dir, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **config_changes}))
    return target


@pytest.fixture
def hub_home(tmp_path, monkeypatch, llama_dir) -> Path:
    """HF_HOME with `org/name` at main (MAIN_COMMIT) and at branch v2 (V2_COMMIT, whose config differs in
    bos_token_id so the two can be told apart), offline."""
    home = tmp_path / "hf-home"
    v2_dir = _variant(llama_dir, tmp_path, "v2", bos_token_id=2)
    _snapshot(home / "hub", "org/name", MAIN_COMMIT, Path(llama_dir), refs=["main"])
    _snapshot(home / "hub", "org/name", V2_COMMIT, v2_dir, refs=["v2"])
    for name in ("HF_HUB_CACHE", "XDG_CACHE_HOME", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def _settings(home: Path) -> HubSettings:
    return HubSettings(home / "hub", offline=True)


# ----------------------------------------------------------------------------------------------
# From the cache, offline


def test_hub_id_resolves_to_its_cached_snapshot(hub_home: Path) -> None:
    resolved = resolve_model("org/name", settings=HubSettings.from_environ({"HF_HOME": str(hub_home)}))
    assert resolved.model_dir == hub_home / "hub" / "models--org--name" / "snapshots" / MAIN_COMMIT
    assert resolved.revision == MAIN_COMMIT  # what workers on other nodes are pinned to
    assert resolved.served_name == "org/name"


@pytest.mark.parametrize("revision, commit", [("main", MAIN_COMMIT), ("v2", V2_COMMIT), (V2_COMMIT, V2_COMMIT)])
def test_revision_picks_its_snapshot(hub_home: Path, revision: str, commit: str) -> None:
    resolved = resolve_model("org/name", revision, _settings(hub_home))
    assert resolved.model_dir.name == commit
    assert resolved.revision == commit


def test_local_directory_is_used_as_it_is(llama_dir: str) -> None:
    resolved = resolve_model(llama_dir, settings=HubSettings(Path("/nonexistent"), offline=True))
    assert resolved.model_dir == Path(llama_dir)
    assert resolved.revision is None
    assert resolved.served_name == Path(llama_dir).name


def test_settings_follow_huggingface_hub_environment() -> None:
    home = {"HF_HOME": "/h", "XDG_CACHE_HOME": "/x"}
    assert HubSettings.from_environ({}).cache_dir == Path("~/.cache/huggingface/hub").expanduser()
    assert HubSettings.from_environ({"XDG_CACHE_HOME": "/x"}).cache_dir == Path("/x/huggingface/hub")
    assert HubSettings.from_environ(home).cache_dir == Path("/h/hub")
    assert HubSettings.from_environ({**home, "HF_HUB_CACHE": "/c"}).cache_dir == Path("/c")
    assert HubSettings.from_environ({**home, "HF_HUB_CACHE": "/c"}, download_dir="/d").cache_dir == Path("/d")
    assert HubSettings.from_environ({"HF_HUB_OFFLINE": "1", "HF_TOKEN": "t"}) == HubSettings(
        Path("~/.cache/huggingface/hub").expanduser(), offline=True, token="t"
    )
    assert not HubSettings.from_environ({"HF_HUB_OFFLINE": "0"}).offline


def test_serve_pins_the_commit_and_names_the_model_as_given(hub_home: Path) -> None:
    args = build_parser().parse_args(["serve", "--model", "org/name", "--revision", "v2", "--device", "cpu"])
    model, engine_config, tokenizer_dir = serve.resolve_serve_model(engine_config_from_args(args))
    assert model.served_name == "org/name"
    assert engine_config.model == "org/name" and engine_config.revision == V2_COMMIT
    assert tokenizer_dir == str(model.model_dir)
    assert model_source(engine_config) == f"org/name@{V2_COMMIT}"  # what the workers report, on any node
    # a worker resolving what it was given finds the same snapshot
    assert local_model_dir(engine_config) == str(hub_home / "hub" / "models--org--name" / "snapshots" / V2_COMMIT)


def test_cli_passes_revision_download_dir_and_tokenizer() -> None:
    argv = ["generate", "--model", "org/name", "--revision", "v2", "--download-dir", "/d", "--tokenizer", "org/tok"]
    config = engine_config_from_args(build_parser().parse_args(argv))
    assert (config.model, config.revision, config.download_dir, config.tokenizer) == ("org/name", "v2", "/d", "org/tok")


def test_offline_llm_loads_a_hub_id(hub_home: Path) -> None:
    llm = LLM(model="org/name", revision="v2", device="cpu", num_kv_blocks=16, max_num_seqs=2)
    assert llm.engine.model_dir == str(hub_home / "hub" / "models--org--name" / "snapshots" / V2_COMMIT)
    assert llm.engine.hf_config.bos_token_id == 2
    assert len(llm.generate([[1, 2, 3]])[0].outputs[0].token_ids) > 0


# ----------------------------------------------------------------------------------------------
# Clear errors, naming the model, the revision and the cause


def test_unknown_id_offline_is_a_clear_error(hub_home: Path) -> None:
    with pytest.raises(ModelResolutionError, match=r"'org/missing' at revision 'main'.*not in the cache") as info:
        resolve_model("org/missing", settings=_settings(hub_home))
    assert (info.value.model, info.value.revision) == ("org/missing", "main")


def test_unknown_revision_offline_is_a_clear_error(hub_home: Path) -> None:
    with pytest.raises(ModelResolutionError, match=r"'org/name' at revision 'v3'"):
        resolve_model("org/name", "v3", _settings(hub_home))


def test_missing_directory_that_is_no_hub_id(tmp_path: Path) -> None:
    with pytest.raises(ModelResolutionError, match="no such directory exists, and it is not a Hub id"):
        resolve_model(str(tmp_path / "absent"), settings=_settings(tmp_path))


def test_unsupported_architecture_is_refused(hub_home: Path, llama_dir: str, tmp_path: Path) -> None:
    gpt2 = _variant(llama_dir, tmp_path, "gpt2", architectures=["GPT2LMHeadModel"])
    _snapshot(hub_home / "hub", "org/gpt2", MAIN_COMMIT, gpt2, refs=["main"])
    with pytest.raises(ModelResolutionError, match=r"'org/gpt2' at revision 'main'.*'GPT2LMHeadModel' is not supp"):
        resolve_model("org/gpt2", settings=_settings(hub_home))


def test_pickle_only_repo_is_refused(hub_home: Path, llama_dir: str, tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(llama_dir, pickled, ignore=shutil.ignore_patterns("*.safetensors*"))
    (pickled / "pytorch_model.bin").write_bytes(b"not unpickled")
    _snapshot(hub_home / "hub", "org/pickled", MAIN_COMMIT, pickled, refs=["main"])
    with pytest.raises(ModelResolutionError, match=r"'org/pickled'.*only pickle checkpoints \(pytorch_model.bin\)"):
        resolve_model("org/pickled", settings=_settings(hub_home))
    # random weights need none: the config and tokenizer are enough
    assert resolve_model("org/pickled", settings=_settings(hub_home), need_weights=False).revision == MAIN_COMMIT


def test_serve_exits_with_the_message_before_starting_anything(hub_home: Path) -> None:
    with pytest.raises(SystemExit, match=r"tristage serve: cannot get model 'org/missing' at revision 'main'"):
        serve.run(serve.ServeConfig(engine=EngineConfig(model="org/missing", device="cpu")))


def test_cli_exits_non_zero_with_the_message(hub_home: Path) -> None:
    with pytest.raises(SystemExit, match=r"tristage generate: cannot get model 'org/missing'") as info:
        main(["generate", "--model", "org/missing", "--device", "cpu"])
    assert info.value.code not in (0, None)  # a message as the code: Python prints it and exits 1


# ----------------------------------------------------------------------------------------------
# Online, through a fake Hub: what is fetched, and once per node


class FakeHub:
    """A HubClient whose repo is `files` (name -> bytes): `fetch` copies the matching files not yet in the
    snapshot (huggingface_hub's cache behaves so), slowly, and counts every copy and overlapping call."""

    def __init__(self, cache_dir: Path, files: dict[str, bytes], commit: str = MAIN_COMMIT) -> None:
        self.snapshot_dir = cache_dir / "models--org--name" / "snapshots" / commit
        self.files = files
        self.downloads: list[str] = []
        self.patterns: list[list[str]] = []
        self.active = 0
        self.most_active = 0
        self._guard = threading.Lock()

    def fetch(self, repo_id: str, revision: str | None, allow_patterns: Sequence[str]) -> Path:
        from fnmatch import fnmatch

        with self._guard:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            self.patterns.append(list(allow_patterns))
        try:
            self.snapshot_dir.mkdir(parents=True, exist_ok=True)
            for name, data in self.files.items():
                if any(fnmatch(name, p) for p in allow_patterns) and not (self.snapshot_dir / name).exists():
                    time.sleep(0.01)  # a download takes time: a second resolver would overlap it without the lock
                    (self.snapshot_dir / name).write_bytes(data)
                    with self._guard:
                        self.downloads.append(name)
            return self.snapshot_dir
        finally:
            with self._guard:
                self.active -= 1

    def list_files(self, repo_id: str, commit: str) -> list[str] | None:
        return sorted(self.files)


def _repo_files(model_dir: str, **extra: bytes) -> dict[str, bytes]:
    return {**{p.name: p.read_bytes() for p in Path(model_dir).iterdir() if p.is_file()}, **extra}


def test_fetches_config_then_metadata_then_only_the_weights_the_loader_reads(llama_dir: str, tmp_path: Path) -> None:
    files = _repo_files(llama_dir, **{"pytorch_model.bin": b"x", "consolidated.safetensors": b"x", "README.md": b"x"})
    hub = FakeHub(tmp_path, files)
    resolve_model("org/name", settings=HubSettings(tmp_path), hub=hub)
    assert hub.patterns[0] == ["config.json"]
    assert hub.patterns[-1] == ["model.safetensors"]
    assert "pytorch_model.bin" not in hub.downloads
    assert "consolidated.safetensors" not in hub.downloads and "README.md" not in hub.downloads
    assert sorted(hub.downloads) == sorted(set(files) - {"pytorch_model.bin", "consolidated.safetensors", "README.md"})


def test_sharded_checkpoint_fetches_the_shards_its_index_names(llama_dir: str, tmp_path: Path) -> None:
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    files = {
        "config.json": Path(llama_dir, "config.json").read_bytes(),
        "model.safetensors.index.json": json.dumps(index).encode(),
        "model-00001-of-00002.safetensors": b"1",
        "model-00002-of-00002.safetensors": b"2",
        "consolidated.safetensors": b"both again",
    }
    hub = FakeHub(tmp_path, files)
    resolve_model("org/name", settings=HubSettings(tmp_path), hub=hub)
    assert hub.patterns[-1] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert "consolidated.safetensors" not in hub.downloads


def test_unsupported_architecture_fetches_nothing_but_its_config(llama_dir: str, tmp_path: Path) -> None:
    gpt2 = _variant(llama_dir, tmp_path, "gpt2", architectures=["GPT2LMHeadModel"])
    hub = FakeHub(tmp_path / "cache", _repo_files(str(gpt2)))
    with pytest.raises(ModelResolutionError, match="GPT2LMHeadModel"):
        resolve_model("org/name", settings=HubSettings(tmp_path / "cache"), hub=hub)
    assert hub.downloads == ["config.json"]


def test_pickle_only_repo_online_is_refused_without_fetching_the_pickle(llama_dir: str, tmp_path: Path) -> None:
    files = {name: data for name, data in _repo_files(llama_dir).items() if "safetensors" not in name}
    hub = FakeHub(
        tmp_path, {**files, "pytorch_model-00001-of-00002.bin": b"x", "pytorch_model-00002-of-00002.bin": b"x"}
    )
    with pytest.raises(ModelResolutionError, match=r"only pickle checkpoints \(pytorch_model-00001-of-00002.bin, "):
        resolve_model("org/name", settings=HubSettings(tmp_path), hub=hub)
    assert not any(name.endswith(".bin") for name in hub.downloads)


def test_two_resolvers_on_one_node_download_once(llama_dir: str, tmp_path: Path) -> None:
    """Two workers of a node starting together: one fetches under the node's lock, the other then finds
    every file in the cache; both get the same directory."""
    files = _repo_files(llama_dir)
    hub = FakeHub(tmp_path, files)
    results: list[Path] = []
    errors: list[BaseException] = []

    def resolve() -> None:
        try:
            results.append(resolve_model("org/name", settings=HubSettings(tmp_path), hub=hub).model_dir)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=resolve) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not errors
    assert results == [hub.snapshot_dir, hub.snapshot_dir]
    assert sorted(hub.downloads) == sorted(files)  # each file once
    assert hub.most_active == 1  # the lock: never two fetches at once
    assert (tmp_path / LOCK_DIR / "models--org--name@main.lock").exists()


def test_tokenizer_from_the_hub_fetches_tokenizer_files_only(llama_dir: str, tmp_path: Path) -> None:
    files = _repo_files(llama_dir)
    hub = FakeHub(tmp_path, files)
    assert resolve_tokenizer("org/name", settings=HubSettings(tmp_path), hub=hub) == hub.snapshot_dir
    assert "tokenizer.json" in hub.downloads or "tokenizer_config.json" in hub.downloads
    assert not any(name.endswith(".safetensors") or name == "config.json" for name in hub.downloads)


# ----------------------------------------------------------------------------------------------
# Deployment


def test_helm_chart_passes_the_id_revision_token_and_shared_cache() -> None:
    from tests.unit.test_deploy_helm import find, render

    values = {
        "model": {
            "id": "org/name",
            "revision": V2_COMMIT,
            "hfToken": {"existingSecret": "hf"},
            "hubCache": {"existingClaim": "hub-cache"},
        }
    }
    docs = render(values)
    gateway = find(docs, "Deployment")["spec"]["template"]["spec"]
    worker = find(docs, "RayCluster")["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    args = gateway["containers"][0]["args"]
    assert args[args.index("--model") + 1] == "org/name" and args[args.index("--revision") + 1] == V2_COMMIT
    for pod in (gateway, worker):
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["HF_HOME"]["value"] == "/hf-cache"
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
        assert {"name": "hf-cache", "persistentVolumeClaim": {"claimName": "hub-cache"}} in pod["volumes"]
        assert {"name": "hf-cache", "mountPath": "/hf-cache"} in pod["containers"][0]["volumeMounts"]
