"""Reading HF-format model directories: the config, and the weights streamed tensor by tensor.

A directory holds config.json and either one `model.safetensors` or shards listed in
`model.safetensors.index.json` (`weight_map`: tensor name -> shard file). `iter_weights` opens one
shard at a time and yields its tensors one by one, so the caller can copy each into the model and
drop it: host memory never holds a second full copy of the model. Pickle checkpoints (`.bin`,
`.pt`, `.pth`) are refused, never unpickled. Every problem raises `ModelLoadError` naming the file
or field that is wrong.

Vision-language checkpoints hold a language model and a vision tower side by side; each consumer
streams only its own tensors: `iter_weights(..., rename=...)` with a rename from `models.checkpoint`
skips the others unread, and never opens a shard that holds none of its tensors. Their language-model
fields sit in `text_config` (transformers also accepts them flat, as some Qwen2-VL configs have them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open

from services.common.errors import ModelLoadError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# A vision tower and projector in front of one of the decoders above (services.engine.multimodal).
VISION_LANGUAGE_ARCHITECTURES = (
    "LlavaForConditionalGeneration",
    "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
)
ALL_ARCHITECTURES = SUPPORTED_ARCHITECTURES + VISION_LANGUAGE_ARCHITECTURES
REQUIRED_CONFIG_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _model_dir(model_dir: str | os.PathLike) -> Path:
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelLoadError(f"model directory {path} does not exist or is not a directory")
    return path


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot be read: {e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e


# ----------------------------------------------------------------------------------------------
# Config


def _check_architecture(config_path: Path, raw: dict[str, Any]) -> None:
    architectures = raw.get("architectures")
    if not isinstance(architectures, list) or not architectures:
        raise ModelLoadError(
            f"{config_path}: field 'architectures' is missing or empty; expected one of {', '.join(ALL_ARCHITECTURES)}"
        )
    if len(architectures) != 1:
        raise ModelLoadError(
            f"{config_path}: field 'architectures' must name exactly one architecture, got {architectures}"
        )
    if architectures[0] not in ALL_ARCHITECTURES:
        raise ModelLoadError(
            f"{config_path}: architecture {architectures[0]!r} is not supported; "
            f"supported: {', '.join(ALL_ARCHITECTURES)}"
        )


def read_model_config(model_dir: str | os.PathLike) -> transformers.PretrainedConfig:
    """Validate `model_dir/config.json` and load it with transformers (local files only)."""
    path = _model_dir(model_dir)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise ModelLoadError(f"{config_path} does not exist: a model directory needs an HF config.json")
    raw = _read_json(config_path)
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{config_path}: expected a JSON object, got {type(raw).__name__}")
    _check_architecture(config_path, raw)
    text_fields = {**raw, **raw["text_config"]} if isinstance(raw.get("text_config"), dict) else raw
    missing = [name for name in REQUIRED_CONFIG_FIELDS if text_fields.get(name) is None]
    if missing:
        raise ModelLoadError(f"{config_path}: required field(s) missing: {', '.join(missing)}")
    try:
        return transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many types for a config it cannot build
        raise ModelLoadError(f"{config_path}: transformers cannot load it: {e}") from e


# ----------------------------------------------------------------------------------------------
# Weights


@dataclass(frozen=True)
class _Shard:
    path: Path
    tensor_names: tuple[str, ...] | None  # None: every tensor in the file


def _refuse_pickle(path: Path) -> None:
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ModelLoadError(
            f"{path}: only pickle checkpoints found ({', '.join(pickled)}); tristage never "
            "unpickles weights: convert them to safetensors (model.safetensors)"
        )


def _shards_from_index(index_path: Path) -> list[_Shard]:
    index = _read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{index_path}: field 'weight_map' is missing or empty")
    names_by_file: dict[str, list[str]] = {}
    for tensor_name, file_name in weight_map.items():
        if not isinstance(file_name, str) or Path(file_name).name != file_name or file_name in ("", ".", ".."):
            raise ModelLoadError(
                f"{index_path}: weight_map[{tensor_name!r}] = {file_name!r} is not a file name in the model directory"
            )
        names_by_file.setdefault(file_name, []).append(tensor_name)
    shards = []
    for file_name, tensor_names in names_by_file.items():
        shard_path = index_path.parent / file_name
        if not shard_path.is_file():
            raise ModelLoadError(f"{index_path} names shard {file_name}, which does not exist")
        shards.append(_Shard(shard_path, tuple(tensor_names)))
    return shards


def _find_shards(model_dir: str | os.PathLike) -> list[_Shard]:
    path = _model_dir(model_dir)
    if (path / SAFETENSORS_INDEX_FILE).is_file():
        return _shards_from_index(path / SAFETENSORS_INDEX_FILE)
    if (path / SAFETENSORS_FILE).is_file():
        return [_Shard(path / SAFETENSORS_FILE, None)]
    _refuse_pickle(path)
    raise ModelLoadError(
        f"{path}: no weight files ({SAFETENSORS_FILE} or {SAFETENSORS_INDEX_FILE}); "
        'load_format="dummy" runs with random weights and needs none'
    )


def _open(shard: _Shard) -> Any:
    try:
        return safe_open(str(shard.path), framework="pt")
    except Exception as e:  # SafetensorError, OSError, ...: a truncated or corrupt header
        raise ModelLoadError(f"{shard.path}: not a readable safetensors file: {e}") from e


def _names_in(shard: _Shard, handle: Any) -> tuple[str, ...]:
    stored = tuple(handle.keys())
    if shard.tensor_names is None:
        return stored
    absent = sorted(set(shard.tensor_names) - set(stored))
    if absent:
        raise ModelLoadError(
            f"{shard.path}: the index places {len(absent)} tensor(s) here that the file lacks, e.g. {absent[0]!r}"
        )
    return shard.tensor_names


def check_dir_for_weights(model_dir: str | os.PathLike) -> None:
    """Pre-flight for `iter_weights`: find every weight file and read its header, but no tensor."""
    for shard in _find_shards(model_dir):
        with _open(shard) as handle:
            _names_in(shard, handle)


# checkpoint tensor name -> the name to yield it under, or None to skip it without reading it
Rename = Callable[[str], str | None]


def iter_weights(model_dir: str | os.PathLike, rename: Rename | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF parameter name, tensor) in stored dtype, one shard open at a time.

    With `rename`, only the tensors it maps to a name are read, and they are yielded under that name;
    an indexed shard none of whose tensors is wanted is not opened. The directory is checked when this
    is called (a missing or refused checkpoint raises here); a file that turns out corrupt raises while
    iterating.
    """
    shards = _find_shards(model_dir)
    if rename is not None:
        shards = [s for s in shards if s.tensor_names is None or any(rename(n) is not None for n in s.tensor_names)]
    return _stream_tensors(shards, rename or _keep_name)


def _keep_name(name: str) -> str:
    return name


def _stream_tensors(shards: list[_Shard], rename: Rename) -> Iterator[tuple[str, torch.Tensor]]:
    for shard in shards:
        with _open(shard) as handle:
            for name in _names_in(shard, handle):
                new_name = rename(name)
                if new_name is None:
                    continue
                try:
                    tensor = handle.get_tensor(name)
                except Exception as e:
                    raise ModelLoadError(f"{shard.path}: cannot read tensor {name!r}: {e}") from e
                yield new_name, tensor
