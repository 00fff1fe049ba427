"""The embedded default model: tokenizer, chat template, model builder and the build-once cache."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
import transformers

from services.engine.default_model import (
    DEFAULT_MODEL_NAME,
    TOKENIZER_VOCAB_SIZE,
    _publish,
    build_model_dir,
    build_tokenizer,
    default_model_path,
)
from services.engine.models.loader import SUPPORTED_ARCHITECTURES, iter_weights, read_model_config

CACHED_DIR_NAME = f"{DEFAULT_MODEL_NAME}-v1"
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 512,
}
MIXED_TEXT = "Hello, world! 42 + 7 = 49; café Zürich naïve → 東京 привет 😊\n  indented\ttab"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


def _load_and_run(model_dir: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    with torch.no_grad():
        return model(torch.tensor([[0, 5, 17, 300, 2]])).logits  # [batch, num_tokens, vocab_size]


# ----------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_round_trips_text(tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    token_ids = tokenizer.encode(MIXED_TEXT)
    assert tokenizer.decode(token_ids) == MIXED_TEXT
    assert len(token_ids) < len(MIXED_TEXT.encode())  # merges happened
    assert 900 <= len(tokenizer) <= TOKENIZER_VOCAB_SIZE


def test_special_tokens(tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    assert tokenizer.bos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_tokenizer_build_is_deterministic(tokenizer_dir: Path, tmp_path: Path) -> None:
    build_tokenizer(tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()


def test_chat_template(tokenizer_dir: Path, tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    assert "chat_template" in json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "now?"}]},
    ]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nAnd now?<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert prompt == rendered + "<|im_start|>assistant\n"


# ----------------------------------------------------------------------------------------------
# Model directories


@pytest.mark.parametrize("architecture", SUPPORTED_ARCHITECTURES)
def test_every_architecture_loads_and_runs(architecture: str, tokenizer_dir: Path, tmp_path: Path) -> None:
    model_dir = build_model_dir(tmp_path, architecture, tokenizer_dir=tokenizer_dir)
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (model_dir / name).is_file(), name

    config = read_model_config(model_dir)
    assert config.architectures == [architecture]
    assert (config.hidden_size, config.num_key_value_heads, config.head_dim, config.vocab_size) == (64, 2, 16, 1024)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (0, 2, 0)
    assert getattr(config, "sliding_window", None) is None

    logits = _load_and_run(model_dir)
    assert logits.shape == (1, 5, 1024)
    assert torch.isfinite(logits).all()


def test_architecture_specific_weights(tokenizer_dir: Path, tmp_path: Path) -> None:
    qwen2 = dict(iter_weights(build_model_dir(tmp_path / "qwen2", "Qwen2ForCausalLM", tokenizer_dir=tokenizer_dir)))
    qwen3 = dict(iter_weights(build_model_dir(tmp_path / "qwen3", "Qwen3ForCausalLM", tokenizer_dir=tokenizer_dir)))
    assert qwen2["model.layers.0.self_attn.q_proj.bias"].shape == (64,)
    assert qwen2["model.layers.0.self_attn.k_proj.bias"].shape == (32,)
    assert qwen3["model.layers.1.self_attn.k_norm.weight"].shape == (16,)
    # Norm weights and biases are perturbed away from their constant initial values.
    assert qwen2["model.layers.0.self_attn.v_proj.bias"].abs().min() > 0
    assert qwen3["model.layers.0.self_attn.q_norm.weight"].std() > 0.01
    assert qwen3["model.norm.weight"].std() > 0.01


def test_weights_depend_only_on_seed(tokenizer_dir: Path, tmp_path: Path) -> None:
    rng_state = torch.random.get_rng_state()
    first = build_model_dir(tmp_path / "a", tokenizer_dir=tokenizer_dir, seed=1)
    again = build_model_dir(tmp_path / "b", tokenizer_dir=tokenizer_dir, seed=1)
    other = build_model_dir(tmp_path / "c", tokenizer_dir=tokenizer_dir, seed=2)
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(dict(iter_weights(first))[name], dict(iter_weights(again))[name])
    assert not torch.equal(dict(iter_weights(first))[name], dict(iter_weights(other))[name])


def test_initializer_range_makes_peaked_logits(tokenizer_dir: Path, tmp_path: Path) -> None:
    weights = dict(iter_weights(build_model_dir(tmp_path, tokenizer_dir=tokenizer_dir)))
    assert weights["model.embed_tokens.weight"].std() == pytest.approx(0.2, rel=0.05)


@pytest.mark.parametrize(
    "rope_overrides",
    [
        {"rope_scaling": dict(LLAMA3_ROPE), "rope_theta": 500000.0},
        {"rope_parameters": {**LLAMA3_ROPE, "rope_theta": 500000.0}},
    ],
    ids=["rope_scaling", "rope_parameters"],
)
def test_llama3_rope_override(rope_overrides: dict, tokenizer_dir: Path, tmp_path: Path) -> None:
    model_dir = build_model_dir(tmp_path, tokenizer_dir=tokenizer_dir, **rope_overrides)
    on_disk = json.loads((model_dir / "config.json").read_text())
    assert on_disk["rope_parameters"] == {**LLAMA3_ROPE, "rope_theta": 500000.0}
    assert read_model_config(model_dir).rope_parameters["rope_type"] == "llama3"
    assert torch.isfinite(_load_and_run(model_dir)).all()


def test_default_rope_on_disk(tokenizer_dir: Path, tmp_path: Path) -> None:
    model_dir = build_model_dir(tmp_path, tokenizer_dir=tokenizer_dir)
    on_disk = json.loads((model_dir / "config.json").read_text())
    assert on_disk["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}


def test_other_overrides(tokenizer_dir: Path, tmp_path: Path) -> None:
    model_dir = build_model_dir(
        tmp_path,
        tokenizer_dir=tokenizer_dir,
        tie_word_embeddings=True,
        num_key_value_heads=1,
        attention_bias=True,
        bos_token_id=1,
    )
    config = read_model_config(model_dir)
    assert (config.tie_word_embeddings, config.num_key_value_heads, config.bos_token_id) == (True, 1, 1)
    weights = dict(iter_weights(model_dir))
    assert "lm_head.weight" not in weights
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (16, 64)
    assert "model.layers.0.self_attn.o_proj.bias" in weights
    assert torch.isfinite(_load_and_run(model_dir)).all()


def test_generation_config_stops_on_both_end_tokens(tokenizer_dir: Path, tmp_path: Path) -> None:
    model_dir = build_model_dir(tmp_path, tokenizer_dir=tokenizer_dir)
    generation_config = json.loads((model_dir / "generation_config.json").read_text())
    assert generation_config["eos_token_id"] == [2, 0]


def test_unknown_architecture_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        build_model_dir(tmp_path, "GPT2LMHeadModel")


# ----------------------------------------------------------------------------------------------
# Cached default model


def _mtimes_ns(model_dir: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in [model_dir, *model_dir.iterdir()]}


def _leftovers(models_dir: Path) -> list[str]:
    return sorted(path.name for path in models_dir.iterdir() if path.name != CACHED_DIR_NAME)


def test_default_model_is_built_once_then_reused(tmp_path: Path) -> None:
    model_dir = default_model_path(tmp_path)
    assert model_dir == tmp_path / "models" / CACHED_DIR_NAME
    assert read_model_config(model_dir).architectures == ["LlamaForCausalLM"]
    assert (model_dir / "tokenizer.json").is_file()
    built = _mtimes_ns(model_dir)

    assert default_model_path(tmp_path) == model_dir
    assert _mtimes_ns(model_dir) == built
    assert _leftovers(tmp_path / "models") == []


def test_cache_root_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("TRISTAGE_CACHE_DIR", raising=False)
    assert default_model_path() == tmp_path / "xdg" / "tristage" / "models" / CACHED_DIR_NAME
    monkeypatch.setenv("TRISTAGE_CACHE_DIR", str(tmp_path / "own"))
    assert default_model_path() == tmp_path / "own" / "models" / CACHED_DIR_NAME
    assert default_model_path(tmp_path / "arg") == tmp_path / "arg" / "models" / CACHED_DIR_NAME


def test_concurrent_builds_publish_one_complete_dir(tmp_path: Path) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def build() -> None:
        start.wait()
        try:
            results.append(default_model_path(tmp_path))
        except BaseException as e:  # reported below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert results == [tmp_path / "models" / CACHED_DIR_NAME] * 3
    assert torch.isfinite(_load_and_run(results[0])).all()
    assert _leftovers(tmp_path / "models") == []


def test_half_written_leftovers_are_not_trusted(tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    crashed_build = models_dir / f".{CACHED_DIR_NAME}.building-crashed"
    crashed_build.mkdir(parents=True)
    (crashed_build / "config.json").write_text("{")
    incomplete = models_dir / CACHED_DIR_NAME
    incomplete.mkdir()
    (incomplete / "config.json").write_text("{")

    model_dir = default_model_path(tmp_path)
    assert model_dir == incomplete
    assert read_model_config(model_dir).architectures == ["LlamaForCausalLM"]
    assert _leftovers(models_dir) == [crashed_build.name]  # another process's build may still be running


def test_a_build_that_loses_the_race_keeps_the_winner(tmp_path: Path) -> None:
    winner = default_model_path(tmp_path)
    built = _mtimes_ns(winner)
    loser = build_model_dir(tmp_path / "models" / ".loser")
    _publish(loser, winner)
    assert _mtimes_ns(winner) == built
    assert loser.exists()  # left for the caller, which removes its own staging directory
