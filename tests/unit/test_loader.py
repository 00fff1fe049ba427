"""Model directory loading: config validation and streamed safetensors weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from services.common.errors import ModelLoadError
from services.engine.default_model import build_model_dir, build_tokenizer
from services.engine.models import loader
from services.engine.models.loader import (
    SUPPORTED_ARCHITECTURES,
    check_dir_for_weights,
    iter_weights,
    read_model_config,
)

SHARD_SIZE = "100KB"  # the 1024 x 64 float32 embedding (256 KiB) alone overflows it: several shards


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def unsharded_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("unsharded"), tokenizer_dir=tokenizer_dir, seed=3)


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return build_model_dir(
        tmp_path_factory.mktemp("sharded"), tokenizer_dir=tokenizer_dir, seed=3, max_shard_size=SHARD_SIZE
    )


def _copy(model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "model"))


def _shard_names(model_dir: Path) -> list[str]:
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    return list(dict.fromkeys(index["weight_map"].values()))


# ----------------------------------------------------------------------------------------------
# Weights


def test_sharded_and_unsharded_stream_the_state_dict(unsharded_dir: Path, sharded_dir: Path) -> None:
    assert not (unsharded_dir / "model.safetensors.index.json").exists()
    assert len(_shard_names(sharded_dir)) > 2
    state_dict = transformers.AutoModelForCausalLM.from_pretrained(unsharded_dir).state_dict()

    for model_dir in (unsharded_dir, sharded_dir):
        weights = dict(iter_weights(model_dir))
        assert sorted(weights) == sorted(state_dict)
        for name, tensor in weights.items():
            assert tensor.dtype == torch.float32
            assert torch.equal(tensor, state_dict[name]), name


def test_iter_weights_keeps_stored_dtype(tmp_path: Path, tokenizer_dir: Path) -> None:
    model_dir = build_model_dir(tmp_path, tokenizer_dir=tokenizer_dir, dtype=torch.bfloat16)
    assert {tensor.dtype for _, tensor in iter_weights(model_dir)} == {torch.bfloat16}


def test_iter_weights_holds_one_shard_open_at_a_time(sharded_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_safe_open = loader.safe_open
    opened: list[str] = []
    num_open = [0]

    class CountingSafeOpen:
        def __init__(self, filename: str, framework: str) -> None:
            self._handle = real_safe_open(filename, framework=framework)
            opened.append(Path(filename).name)

        def __enter__(self) -> object:
            num_open[0] += 1
            return self._handle.__enter__()

        def __exit__(self, *exc_info: object) -> None:
            num_open[0] -= 1
            self._handle.__exit__(*exc_info)

    monkeypatch.setattr(loader, "safe_open", CountingSafeOpen)
    num_open_at_each_tensor = [num_open[0] for _ in iter_weights(sharded_dir)]

    assert num_open_at_each_tensor and set(num_open_at_each_tensor) == {1}
    assert num_open[0] == 0
    assert opened == _shard_names(sharded_dir)  # each shard opened once, in index order


def test_check_dir_for_weights_accepts_good_dirs(unsharded_dir: Path, sharded_dir: Path) -> None:
    check_dir_for_weights(unsharded_dir)
    check_dir_for_weights(sharded_dir)


@pytest.mark.parametrize("check", [check_dir_for_weights, iter_weights])
def test_no_weight_files(check, unsharded_dir: Path, tmp_path: Path) -> None:
    model_dir = _copy(unsharded_dir, tmp_path)
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match='load_format="dummy"'):
        check(model_dir)


@pytest.mark.parametrize("check", [check_dir_for_weights, iter_weights])
def test_index_naming_a_missing_shard(check, sharded_dir: Path, tmp_path: Path) -> None:
    model_dir = _copy(sharded_dir, tmp_path)
    missing = _shard_names(model_dir)[1]
    (model_dir / missing).unlink()
    with pytest.raises(ModelLoadError, match=f"names shard {missing}, which does not exist"):
        check(model_dir)


def test_index_naming_a_path_outside_the_directory(sharded_dir: Path, tmp_path: Path) -> None:
    model_dir = _copy(sharded_dir, tmp_path)
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="not a file name in the model directory"):
        check_dir_for_weights(model_dir)


def test_index_without_weight_map(sharded_dir: Path, tmp_path: Path) -> None:
    model_dir = _copy(sharded_dir, tmp_path)
    (model_dir / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ModelLoadError, match="weight_map"):
        iter_weights(model_dir)


@pytest.mark.parametrize("check", [check_dir_for_weights, iter_weights])
def test_pickle_only_directory_is_refused(check, unsharded_dir: Path, tmp_path: Path) -> None:
    model_dir = _copy(unsharded_dir, tmp_path)
    (model_dir / "model.safetensors").unlink()
    (model_dir / "pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    with pytest.raises(ModelLoadError, match=r"pytorch_model\.bin.*never unpickles"):
        check(model_dir)


@pytest.mark.parametrize("check", [check_dir_for_weights, lambda d: list(iter_weights(d))])
def test_corrupt_safetensors_file(check, unsharded_dir: Path, tmp_path: Path) -> None:
    model_dir = _copy(unsharded_dir, tmp_path)
    weights_path = model_dir / "model.safetensors"
    weights_path.write_bytes(weights_path.read_bytes()[:4096])  # truncated
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: not a readable safetensors file"):
        check(model_dir)


def test_shard_lacking_a_tensor_its_index_names(sharded_dir: Path, tmp_path: Path) -> None:
    model_dir = _copy(sharded_dir, tmp_path)
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.extra.weight"] = _shard_names(model_dir)[0]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"model.extra.weight"):
        check_dir_for_weights(model_dir)


# ----------------------------------------------------------------------------------------------
# Config


def test_read_model_config(unsharded_dir: Path) -> None:
    config = read_model_config(unsharded_dir)
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (64, 2, 1024)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        read_model_config(tmp_path / "absent")
    with pytest.raises(ModelLoadError, match="does not exist"):
        iter_weights(tmp_path / "absent")


def test_missing_config(unsharded_dir: Path, tmp_path: Path) -> None:
    model_dir = _copy(unsharded_dir, tmp_path)
    (model_dir / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"config\.json does not exist"):
        read_model_config(model_dir)


def test_bad_json_names_file_and_line(unsharded_dir: Path, tmp_path: Path) -> None:
    model_dir = _copy(unsharded_dir, tmp_path)
    (model_dir / "config.json").write_text('{\n  "hidden_size": 64,\n  "vocab_size": 1024,,\n}\n')
    with pytest.raises(ModelLoadError, match=r"config\.json: invalid JSON at line 3"):
        read_model_config(model_dir)


def _edit_config(model_dir: Path, **changes: object) -> None:
    config_path = model_dir / "config.json"
    raw = json.loads(config_path.read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key)
        else:
            raw[key] = value
    config_path.write_text(json.dumps(raw))


def test_unsupported_architecture_is_named(unsharded_dir: Path, tmp_path: Path) -> None:
    model_dir = _copy(unsharded_dir, tmp_path)
    _edit_config(model_dir, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ModelLoadError) as excinfo:
        read_model_config(model_dir)
    assert "'GPT2LMHeadModel' is not supported" in str(excinfo.value)
    assert all(name in str(excinfo.value) for name in SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize("architectures", [None, [], ["LlamaForCausalLM", "MistralForCausalLM"]])
def test_architectures_must_name_exactly_one(architectures, unsharded_dir: Path, tmp_path: Path) -> None:
    model_dir = _copy(unsharded_dir, tmp_path)
    _edit_config(model_dir, architectures=architectures)
    with pytest.raises(ModelLoadError, match="'architectures'"):
        read_model_config(model_dir)


@pytest.mark.parametrize("field", ["hidden_size", "intermediate_size"])
def test_missing_required_field(field: str, unsharded_dir: Path, tmp_path: Path) -> None:
    model_dir = _copy(unsharded_dir, tmp_path)
    _edit_config(model_dir, **{field: None})
    with pytest.raises(ModelLoadError, match=f"required field\\(s\\) missing: {field}"):
        read_model_config(model_dir)
