"""What structured outputs cost: output throughput at batch 64 with every request constrained by a JSON
schema, against the same batch unconstrained, in one process on one GPU.

Llama-3.1-8B shapes, dummy weights, and a byte-level BPE vocabulary of the real size (128,256 tokens:
bytes, JSON punctuation, numbers, words; benchmarks.bench_models.write_byte_level_tokenizer), because a
grammar mask costs what the vocabulary makes it cost. Each request has a 128-token prompt and produces
256 tokens. The schema (an object holding an array of at least 10,000 {"name": string, "id": integer}
objects) cannot be completed in 256 tokens, so constrained requests run as long as unconstrained ones
(which ignore eos): the two runs decode the same number of tokens, and the ratio is the masks' cost
(computed on the host while the forward runs, applied on the device) and nothing else.

    python benchmarks/structured_overhead.py --out results/structured_overhead.json
    python benchmarks/structured_overhead.py --tiny    # a tiny config on CPU, to check the script

Target (issue 13): constrained / unconstrained output tok/s >= 0.90.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_models import LLAMA_31_8B, TINY, write_byte_level_tokenizer, write_model_dir
from benchmarks.engine_bench import prompt_ids, sync

SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 10000,
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "id": {"type": "integer"}},
                "required": ["name", "id"],
            },
        }
    },
    "required": ["items"],
}
TARGET_RATIO = 0.90


def generate(engine, batch: int, prompt_len: int, output_len: int, structured, round_index: int) -> dict:
    from services.engine import SamplingParams

    vocab = engine.runner.model.spec.vocab_size
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True, structured=structured)
    for i in range(batch):
        engine.add_request(f"r{round_index}-{i}", prompt_ids(prompt_len, vocab, seed=1000 * round_index + i), params)
    sync()
    start = time.perf_counter()
    tokens = finished_by_grammar = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens += len(out.outputs[0].token_ids)
                finished_by_grammar += out.outputs[0].finish_reason == "stop"
    sync()
    seconds = time.perf_counter() - start
    return {
        "output_tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "stopped": finished_by_grammar,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each kind (alternating); best kept")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from services.common.messages import StructuredSpec
    from services.engine import LLMEngine

    config = TINY if args.tiny else LLAMA_31_8B
    batch, prompt_len, output_len = (8, 16, 32) if args.tiny else (args.batch, 128, 256)
    model_dir = write_model_dir(config)
    write_byte_level_tokenizer(model_dir, config["vocab_size"], config["eos_token_id"])
    engine = LLMEngine(model=model_dir, load_format="dummy", max_num_seqs=batch, enable_prefix_caching=False)
    constrained = StructuredSpec(kind="json", value=json.dumps(SCHEMA))
    kinds = {"unconstrained": None, "json_schema": constrained}
    for spec in kinds.values():  # warm-up: graphs, the grammar tokenizer, the schema's first masks
        generate(engine, batch, prompt_len, output_len, spec, round_index=0)
    rounds: dict[str, list[dict]] = {name: [] for name in kinds}
    for r in range(args.rounds):
        for name, spec in kinds.items():
            rounds[name].append(generate(engine, batch, prompt_len, output_len, spec, round_index=r + 1))
    best = {name: max(runs, key=lambda run: run["tokens_per_s"]) for name, runs in rounds.items()}
    ratio = best["json_schema"]["tokens_per_s"] / best["unconstrained"]["tokens_per_s"]
    summary = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "batch": batch,
        "prompt_tokens": prompt_len,
        "output_tokens": output_len,
        "rounds": rounds,
        "best": best,
        "ratio": ratio,
        "target_ratio": TARGET_RATIO,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1))
    print(f"## structured outputs at batch {batch}: {summary['device']}")
    for name, run in best.items():
        print(
            f"{name}: {run['tokens_per_s']:.0f} output tok/s ({run['output_tokens']} tokens in {run['seconds']:.2f} s)"
        )
    print(f"json_schema / unconstrained: {ratio:.3f} (target >= {TARGET_RATIO})")


if __name__ == "__main__":
    main()
