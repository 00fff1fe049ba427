"""The embedded default model, and the builder that tests use for tiny HF-format directories.

tristage must run anywhere without a download, so it builds its default model locally on first
use: a byte-level BPE tokenizer trained on a corpus generated here, and a two-layer Llama with
random weights. Its text is not meaningful; it exists so that every stage has a real model to run.

    default_model_path()          <cache root>/models/tristage-tiny-v1   (built once, then reused)
    build_model_dir(dir, arch)    config.json + safetensors (+ index when sharded)
                                  + tokenizer files + generation_config.json
    build_tokenizer(dir)          tokenizer.json + tokenizer_config.json (ChatML template)

Tunables (defaults):
    TOKENIZER_VOCAB_SIZE = 1000   BPE target size, special tokens included
    VOCAB_SIZE_MULTIPLE  = 64     the model's vocab_size is the tokenizer's size rounded up to this
    TINY_CONFIG                   hidden 64, intermediate 128, 2 layers, 4 query heads, 2 KV heads,
                                  head_dim 16, 2048 positions, initializer_range 0.2 (random logits
                                  peaked, so greedy comparisons between implementations rarely tie)
    CONSTANT_PARAM_NOISE = 0.1    std of the noise added to parameters that initialise to a constant
                                  (norm weights, biases), so a reimplementation that drops or
                                  misapplies one of them gives different outputs

Cache root: the `cache_dir` argument, else $TRISTAGE_CACHE_DIR, else $XDG_CACHE_HOME/tristage,
else ~/.cache/tristage. The model is built in a temporary sibling directory and renamed into place,
so a crash or two racing processes never leave a half-written model behind.
"""

from __future__ import annotations

import copy
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

DEFAULT_MODEL_NAME = "tristage-tiny"
DEFAULT_MODEL_VERSION = 1

BOS_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (BOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN)

TOKENIZER_VOCAB_SIZE = 1000
VOCAB_SIZE_MULTIPLE = 64
MODEL_MAX_LENGTH = 2048
CONSTANT_PARAM_NOISE = 0.1

# ChatML. Content may be a string or a list of OpenAI-style parts, of which text parts are kept.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": MODEL_MAX_LENGTH,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "initializer_range": 0.2,
}

# architecture -> (model_type, settings that keep attention full-width for these tiny configs)
_ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "LlamaForCausalLM": ("llama", {}),
    "MistralForCausalLM": ("mistral", {"sliding_window": None}),
    "Qwen2ForCausalLM": ("qwen2", {"sliding_window": None, "use_sliding_window": False}),
    "Qwen3ForCausalLM": ("qwen3", {"sliding_window": None, "use_sliding_window": False}),
}

# Files that make up a tokenizer directory; whichever exist are copied.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)

# ----------------------------------------------------------------------------------------------
# Corpus

_SUBJECTS = (
    "the engineer",
    "a small robot",
    "my neighbour",
    "the old library",
    "every student",
    "the river",
    "our team",
    "the quiet cat",
    "a travelling musician",
    "the city council",
    "this program",
    "the weather",
    "an honest merchant",
    "the first train",
    "her grandmother",
    "the server",
    "a curious child",
    "the scheduler",
    "the garden",
    "each worker",
    "the museum",
    "the captain",
)
_VERBS = (
    "reads",
    "builds",
    "carries",
    "remembers",
    "counts",
    "paints",
    "answers",
    "follows",
    "repairs",
    "watches",
    "sends",
    "opens",
    "measures",
    "writes",
    "explains",
    "collects",
    "visits",
    "borrows",
    "prepares",
    "forgets",
    "teaches",
    "describes",
    "compares",
    "finds",
)
_OBJECTS = (
    "a long letter",
    "the blue door",
    "three green apples",
    "the morning news",
    "a broken clock",
    "the map of the valley",
    "several tokens",
    "a cup of tea",
    "the final report",
    "two old books",
    "the secret recipe",
    "a bright lantern",
    "the shopping list",
    "every request",
    "a paper boat",
    "the summer schedule",
    "a warm blanket",
    "the answer",
    "forty small stones",
    "the last song",
)
_ADJECTIVES = (
    "quick",
    "gentle",
    "bright",
    "heavy",
    "simple",
    "careful",
    "ancient",
    "modern",
    "noisy",
    "calm",
    "strange",
    "useful",
    "tiny",
    "enormous",
    "patient",
    "golden",
    "silver",
    "hidden",
    "famous",
)
_PLACES = (
    "in the kitchen",
    "near the station",
    "by the sea",
    "on the hill",
    "at the market",
    "under the bridge",
    "in the north tower",
    "behind the school",
    "across the square",
    "inside the cache",
    "on the third floor",
    "beside the lake",
    "in a café in Zürich",
    "at a piñata party",
    "on the road to Kraków",
    "in São Paulo",
    "near the façade",
)
_TIMES = (
    "every morning",
    "before dinner",
    "at noon",
    "on Sunday",
    "late at night",
    "in the spring",
    "after the rain",
    "twice a week",
    "during the winter",
    "at 7:30",
    "since 1998",
    "by Friday",
)
_CONNECTIVES = ("and then", "because", "although", "while", "so", "but", "until", "after")
_NON_ASCII_WORDS = (
    "café",
    "naïve",
    "résumé",
    "über",
    "Zürich",
    "crème brûlée",
    "jalapeño",
    "fiancée",
    "déjà vu",
    "Straße",
    "smörgåsbord",
    "Ελλάδα",
    "привет",
    "спасибо",
    "東京",
    "こんにちは",
    "你好",
    "안녕하세요",
    "→",
    "€",
    "°C",
    "½",
    "😊",
)
_SYMBOL_LINES = (
    "x = {a} + {b} * 2; y = x - {c};",
    "if (count > {a}) {{ return {b}; }}",
    "total: ${a}.{c:02d} (tax {b}%)",
    "https://example.com/items/{a}?page={b}&sort=asc",
    'user_{a}@example.org wrote: "see section {b}.{c}"',
    "[{a}, {b}, {c}] -> sum = {d}",
    "Q{c}: what is {a} / {b}? A: about {e:.2f}.",
    "#{a} -- ({b}/{c}) :: ok!",
)


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
    if rng.random() < 0.5:
        words.append(rng.choice(_PLACES))
    if rng.random() < 0.4:
        words.append(rng.choice(_TIMES))
    sentence = " ".join(words)
    return sentence[0].upper() + sentence[1:] + rng.choice((".", ".", ".", "!", "?", ";"))


def _numbers_line(rng: random.Random) -> str:
    a, b, c = rng.randint(1, 9999), rng.randint(1, 99), rng.randint(0, 99)
    return rng.choice(_SYMBOL_LINES).format(a=a, b=b, c=c, d=a + b + c, e=a / b)


def _unicode_line(rng: random.Random) -> str:
    word, other = rng.choice(_NON_ASCII_WORDS), rng.choice(_NON_ASCII_WORDS)
    return f'The {rng.choice(_ADJECTIVES)} word "{word}" sits next to {other}, {rng.choice(_TIMES)}.'


def corpus_lines(num_lines: int = 600, seed: int = 0) -> list[str]:
    """A deterministic English-like corpus with digits, punctuation and some multi-byte UTF-8."""
    rng = random.Random(seed)
    lines = []
    for i in range(num_lines):
        kind = i % 6
        if kind == 4:
            lines.append(_numbers_line(rng))
        elif kind == 5:
            lines.append(_unicode_line(rng))
        elif kind == 3:
            lines.append(f"{_sentence(rng)[:-1]}, {rng.choice(_CONNECTIVES)} {_sentence(rng).lower()}")
        else:
            lines.append(_sentence(rng))
    return lines


# ----------------------------------------------------------------------------------------------
# Tokenizer


def _train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_lines(), trainer=trainer)
    return tokenizer


def build_tokenizer(out_dir: str | os.PathLike) -> transformers.PreTrainedTokenizerFast:
    """Train the byte-level BPE tokenizer and save it (with its ChatML template) into `out_dir`.

    Deterministic: two builds write identical tokenizer.json files. The chat template is stored in
    tokenizer_config.json. `<|endoftext|>` is bos and pad, `<|im_end|>` is eos; no bos is prepended.
    """
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(),
        bos_token=BOS_TOKEN,
        eos_token=IM_END_TOKEN,
        pad_token=BOS_TOKEN,
        extra_special_tokens=[IM_START_TOKEN],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    return tokenizer


def _copy_tokenizer(tokenizer_dir: Path, out_dir: Path) -> transformers.PreTrainedTokenizerBase:
    copied = [name for name in _TOKENIZER_FILES if (tokenizer_dir / name).is_file()]
    if "tokenizer.json" not in copied:
        raise FileNotFoundError(f"{tokenizer_dir / 'tokenizer.json'} does not exist")
    for name in copied:
        shutil.copyfile(tokenizer_dir / name, out_dir / name)
    return transformers.AutoTokenizer.from_pretrained(out_dir, local_files_only=True)


# ----------------------------------------------------------------------------------------------
# Model directory


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _model_config(
    architecture: str, tokenizer: transformers.PreTrainedTokenizerBase, overrides: dict[str, Any]
) -> transformers.PretrainedConfig:
    model_type, attention_settings = _ARCHITECTURES[architecture]
    kwargs: dict[str, Any] = {
        **TINY_CONFIG,
        **attention_settings,
        "vocab_size": _round_up(len(tokenizer), VOCAB_SIZE_MULTIPLE),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    # Deep-copied: config classes may fill rope dicts (rope_scaling / rope_parameters) in place.
    kwargs.update(copy.deepcopy(overrides))
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    config.architectures = [architecture]
    return config


def _generation_config(tokenizer: transformers.PreTrainedTokenizerBase) -> transformers.GenerationConfig:
    # A chat turn ends with <|im_end|>; raw text ends with <|endoftext|>. Either stops generation.
    eos_token_ids = [tokenizer.eos_token_id]
    if tokenizer.bos_token_id is not None and tokenizer.bos_token_id not in eos_token_ids:
        eos_token_ids.append(tokenizer.bos_token_id)
    return transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_token_ids,
        pad_token_id=tokenizer.pad_token_id,
    )


@torch.no_grad()
def _perturb_constant_params(model: torch.nn.Module) -> None:
    for param in model.parameters():
        if param.numel() > 0 and bool((param == param.flatten()[0]).all()):
            param.add_(torch.randn_like(param) * CONSTANT_PARAM_NOISE)


def build_model_dir(
    out_dir: str | os.PathLike,
    architecture: str = "LlamaForCausalLM",
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a tiny HF-format model directory with random weights and return its path.

    `config_overrides` replace any config field (e.g. `num_key_value_heads=1`, `attention_bias=True`,
    `tie_word_embeddings=True`, `rope_scaling={...}` or `rope_parameters={...}`). A small
    `max_shard_size` (e.g. "20KB") yields a sharded checkpoint with model.safetensors.index.json.
    The tokenizer is copied from `tokenizer_dir` when given, else trained into `out_dir`.
    Weights depend only on `seed` and the config; the global torch RNG state is left untouched.
    Parameters that initialise to a constant (norm weights at 1, biases at 0) get small noise.
    """
    if architecture not in _ARCHITECTURES:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: {', '.join(_ARCHITECTURES)}")
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        tokenizer = _copy_tokenizer(Path(tokenizer_dir), out_path)
    else:
        tokenizer = build_tokenizer(out_path)

    config = _model_config(architecture, tokenizer, config_overrides)
    model_class = getattr(transformers, architecture)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
        _perturb_constant_params(model)
    model = model.to(dtype).eval()
    model.generation_config = _generation_config(tokenizer)
    save_kwargs: dict[str, Any] = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_path, **save_kwargs)
    return out_path


# ----------------------------------------------------------------------------------------------
# Cached default model

# A published directory holds all of these; anything less was not built by us and is rebuilt.
_COMPLETE_MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("TRISTAGE_CACHE_DIR"):
        return Path(os.environ["TRISTAGE_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "tristage"
    return Path.home() / ".cache" / "tristage"


def _is_complete(model_dir: Path) -> bool:
    return all((model_dir / name).is_file() for name in _COMPLETE_MODEL_FILES)


def _publish(staging_dir: Path, target_dir: Path) -> None:
    """Rename a finished build into place; a complete directory that won a race is kept."""
    try:
        os.replace(staging_dir, target_dir)  # atomic; fails when target_dir exists and is not empty
        return
    except OSError:
        if _is_complete(target_dir):
            return  # another process published first: keep its (identical) build
    stale_dir = Path(tempfile.mkdtemp(prefix=f".{target_dir.name}.stale-", dir=target_dir.parent))
    os.replace(target_dir, stale_dir / target_dir.name)
    os.replace(staging_dir, target_dir)
    shutil.rmtree(stale_dir, ignore_errors=True)


def default_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The directory of the embedded default model, built on first use and reused afterwards."""
    target_dir = _cache_root(cache_dir) / "models" / f"{DEFAULT_MODEL_NAME}-v{DEFAULT_MODEL_VERSION}"
    if _is_complete(target_dir):
        return target_dir
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    staging_dir = Path(tempfile.mkdtemp(prefix=f".{target_dir.name}.building-", dir=target_dir.parent))
    try:
        build_model_dir(staging_dir)
        staging_dir.chmod(0o755)  # mkdtemp made it private; the published cache is readable by all
        _publish(staging_dir, target_dir)
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)  # gone already when it was published
    return target_dir
