"""Model directories for benchmarks: real architecture configs, random weights, a tokenizer that covers the vocab.

Weights are never read (`--load-format dummy`). The tokenizer is a word-level one with one word per id
(" aaaa", " aaab", ...: four letters after a space, byte-level like GPT-2's), so every token of a random
output decodes to visible text and N words encode to exactly N tokens (prompts of exact lengths).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# Llama-3.1-8B's published shapes.
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "bos_token_id": 128253,
    "eos_token_id": 128254,
    "torch_dtype": "bfloat16",
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "rope_theta": 500000.0,
}
# Llama-3.2-1B's published shapes (meta-llama/Llama-3.2-1B config.json: 16 layers, 8 KV heads of 64,
# tied embeddings, llama3 RoPE scaled 32x); bos and eos are the benchmark tokenizer's ids, as above.
LLAMA_32_1B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "bos_token_id": 128253,
    "eos_token_id": 128254,
    "torch_dtype": "bfloat16",
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "rope_theta": 500000.0,
}
TINY = {
    **LLAMA_31_8B,
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 8192,
    "bos_token_id": 1021,
    "eos_token_id": 1022,
}


def write_model_dir(config: dict, path: str | None = None) -> str:
    """config.json plus a word-level tokenizer covering the whole vocab (ids vocab-3.. are <s>, </s>, <pad>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    out = Path(path or tempfile.mkdtemp(prefix="bench-model-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    size = config["vocab_size"]
    vocab = {"\u0120" + _word(i): i for i in range(size - 3)}  # \u0120 is byte-level BPE's space
    vocab.update({"<s>": size - 3, "</s>": size - 2, "<pad>": size - 1})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant {% endif %}"
    )
    fast.save_pretrained(out)
    return str(out)


def _word(index: int) -> str:
    letters = []
    for _ in range(4):
        index, digit = divmod(index, 26)
        letters.append(chr(ord("a") + digit))
    return "".join(reversed(letters))


def add_serve_arg(parser: argparse.ArgumentParser) -> None:
    """--serve-arg: flags passed through to `tristage serve` (args.serve_arg, a list)."""
    parser.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="one argument for tristage serve, written --serve-arg=--flag (repeatable; a value is its own "
        "--serve-arg=VALUE)",
    )


def start_serve(model_dir: str, port: int, *args: str, timeout_s: float = 900) -> subprocess.Popen:
    """`tristage serve` on dummy weights of `model_dir`, served as "bench"; returns once it prints its URL."""
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "serve",
            "--model",
            model_dir,
            "--load-format",
            "dummy",
            "--port",
            str(port),
            "--served-model-name",
            "bench",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    ready, log = threading.Event(), []

    def read() -> None:
        for line in serve.stdout:
            log.append(line)
            if re.search(r"tristage is serving", line):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(timeout_s):
        serve.kill()
        raise RuntimeError("serve did not start:\n" + "".join(log[-40:]))
    return serve


# LLaVA-1.5-7B's published shapes: CLIP ViT-L/14 at 336 px (576 image tokens), Llama-2-7B.
LLAVA_15_7B = {
    "architectures": ["LlavaForConditionalGeneration"],
    "model_type": "llava",
    "image_token_index": 32000,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "torch_dtype": "bfloat16",
    "text_config": {
        "model_type": "llama",
        "vocab_size": 32064,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "bos_token_id": 32061,
        "eos_token_id": 32062,
        "torch_dtype": "bfloat16",
    },
    "vision_config": {
        "model_type": "clip_vision_model",
        "hidden_size": 1024,
        "image_size": 336,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "projection_dim": 768,
    },
}
# The same layout with tiny widths and depths (image size, patch size and token counts unchanged), to
# check the multimodal scripts on a CPU.
TINY_LLAVA = {
    **LLAVA_15_7B,
    "text_config": {
        **LLAVA_15_7B["text_config"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    },
    "vision_config": {
        **LLAVA_15_7B["vision_config"],
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "projection_dim": 32,
    },
}
CLIP_336_PREPROCESSOR = {
    "image_processor_type": "CLIPImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": 336},
    "do_center_crop": True,
    "crop_size": {"height": 336, "width": 336},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "do_convert_rgb": True,
    "resample": 3,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


def write_llava_dir(config: dict = LLAVA_15_7B, path: str | None = None) -> str:
    """A LLaVA directory of real shapes: config, the word-level tokenizer with <image> at the image token
    id, CLIP's image processor settings and a USER/ASSISTANT chat template (weights: dummy)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    out = Path(path or tempfile.mkdtemp(prefix="bench-vlm-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    (out / "preprocessor_config.json").write_text(json.dumps(CLIP_336_PREPROCESSOR))
    size, image_id = config["text_config"]["vocab_size"], config["image_token_index"]
    vocab = {"\u0120" + _word(i): i for i in range(size - 3) if i != image_id}
    vocab.update({"<image>": image_id, "<s>": size - 3, "</s>": size - 2, "<pad>": size - 1})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    fast.save_pretrained(out)
    return str(out)


def write_byte_level_tokenizer(model_dir: str, vocab_size: int, eos_token_id: int) -> None:
    """Replace a model directory's tokenizer with a byte-level BPE vocabulary of `vocab_size` tokens shaped
    like a real one's: the 256 bytes, JSON punctuation runs, numbers, and words with and without a leading
    space. Grammar masks (structured outputs) cost what the vocabulary's tokens make them cost, so
    benchmarking them needs tokens like a real model's, not the word-level tokenizer above, which has no
    punctuation at all. There are no merges: prompts are sent as token ids, and outputs only decode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}

    def add(text: str) -> None:
        token = "".join(byte_chars[b] for b in text.encode())
        if token not in vocab and len(vocab) < vocab_size - 3:
            vocab[token] = len(vocab)

    for b in range(256):
        vocab.setdefault(byte_chars[b], len(vocab))
    punctuation = [
        '{"',
        '":',
        '":"',
        '","',
        '",',
        '"}',
        '"},',
        "},{",
        "}]",
        "[{",
        '": [',
        '": {',
        ", ",
        ": ",
        "\n",
        "  ",
    ]
    for text in punctuation + [str(n) for n in range(1000)] + [f" {n}" for n in range(1000)]:
        add(text)
    index = 0
    while len(vocab) < vocab_size - 3:
        word = _word(index).lstrip("a") or "a"  # 1 to 4 letters
        add(word)
        add(" " + word)
        add(word.capitalize())
        index += 1
    specials = ["<s>", "</s>", "<pad>"]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.add_special_tokens(specials)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    assert fast.convert_tokens_to_ids("</s>") == eos_token_id, "the eos id must be the config's"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (Path(model_dir) / name).unlink(missing_ok=True)
    fast.save_pretrained(model_dir)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest map to code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping
