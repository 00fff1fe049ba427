"""Engine benchmark on one GPU: decode against the memory floor, prefill against the matmul rate,
and end-to-end throughput against transformers' own continuous batching.

Every figure is a ratio to something measured in the same run on the same GPU:
  floors   device-to-device copy bandwidth (bytes read + written) and the bf16 matmul rate
  decode   engine step time at batch 1 / 64 / 256 with a 1k-token context, against the time to
           read the weights (and, at batch > 1, the KV cache) once at the copy bandwidth
  prefill  one 4k-token prompt, achieved FLOP/s against the matmul rate
  e2e      the same batch of 1k-token prompts x 128 output tokens through our engine and through
           transformers' `generate_batch`, output tokens per second

Each part runs in its own process (`--part`), so one engine's memory never limits the other:

    python benchmarks/engine_bench.py --part floors --out results/floors.json
    python benchmarks/engine_bench.py --part ours   --out results/ours.json
    python benchmarks/engine_bench.py --part hf     --out results/hf.json
    python benchmarks/engine_bench.py --report results/floors.json results/ours.json results/hf.json

`--tiny` runs every part on a tiny config (CPU or GPU) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_models import LLAMA_31_8B, TINY, write_model_dir

CONTEXT_TOKENS = 1024
PREFILL_TOKENS = 4096
E2E_BATCH, E2E_OUTPUT_TOKENS = 64, 128


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def prompt_ids(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab - 10, (n,), generator=g).tolist()


# ------------------------------------------------------------------ floors


def measure_floors(tiny: bool) -> dict:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n_bytes = 2**30 if not tiny else 2**24
    src = torch.randn(n_bytes // 4, device=dev)
    dst = torch.empty_like(src)
    copy_s = _time(lambda: dst.copy_(src), repeats=20)
    copy_bw = 2 * n_bytes / copy_s
    n = 8192 if not tiny else 512
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    mm_s = _time(lambda: a @ b, repeats=20)
    result = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "copy_bandwidth_bytes_per_s": copy_bw,
        "bf16_matmul_flops_per_s": 2 * n**3 / mm_s,
    }
    print(f"floors: copy {copy_bw / 1e12:.2f} TB/s, bf16 matmul {result['bf16_matmul_flops_per_s'] / 1e12:.0f} TFLOP/s")
    return result


def _time(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ------------------------------------------------------------------ our engine


def build_engine(model_dir: str, **overrides: Any):
    """The engine every part of `ours` measures: dummy weights, up to 256 sequences, no prefix caching
    (`overrides`: other EngineConfig fields, e.g. small_batch_linear)."""
    from services.engine import LLMEngine

    return LLMEngine(
        model=model_dir,
        load_format="dummy",
        max_num_seqs=256,
        max_num_batched_tokens=PREFILL_TOKENS,
        max_model_len=8192,
        enable_prefix_caching=False,
        **overrides,
    )


def weight_bytes_read_per_step(model) -> int:
    """Parameter bytes one decode step reads: all but the embedding table, of which it reads a few rows."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)


def bench_ours(model_dir: str, tiny: bool) -> dict:
    from services.engine import SamplingParams

    engine = build_engine(model_dir)
    model = engine.runner.model
    spec = model.spec
    weight_bytes = weight_bytes_read_per_step(model)
    kv_bytes_per_token = engine.runner.kv_bytes_per_token
    result = {
        "weight_bytes_read_per_step": weight_bytes,
        "kv_bytes_per_token": kv_bytes_per_token,
        "num_kv_blocks": engine.runner.num_blocks,
        "attention_backend": engine.config.attention_backend,
        "decode": {},
    }
    for batch in (1, 64, 256):
        step_s, forward_s = decode_step_time(engine, batch, SamplingParams, spec.vocab_size, tiny)
        result["decode"][str(batch)] = {
            "step_s": step_s,
            "graph_forward_s": forward_s,
            "context_tokens": CONTEXT_TOKENS,
        }
        forward = f", forward alone {forward_s * 1e3:.2f} ms" if forward_s else ""
        print(f"ours: decode batch {batch}: {step_s * 1e3:.2f} ms/step{forward}, {batch / step_s:.0f} tok/s")
    result["prefill"] = _prefill(engine, SamplingParams, spec)
    result["e2e"] = _e2e_ours(engine, SamplingParams, spec.vocab_size)
    return result


def decode_step_time(engine, batch: int, SamplingParams, vocab: int, tiny: bool) -> tuple[float, float | None]:
    """Median step time and graph-replay time of `batch` requests decoding at a 1k-token context."""
    num_steps = 30 if not tiny else 5
    params = SamplingParams(temperature=0, max_tokens=num_steps + 20, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"d{batch}-{i}", prompt_ids(CONTEXT_TOKENS, vocab, seed=i), params)
    while (
        any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) or engine.scheduler.waiting
    ):
        engine.step()
    for _ in range(5):  # warm
        engine.step()
    sync()
    times = []
    for _ in range(num_steps):
        start = time.perf_counter()
        engine.step()
        sync()
        times.append(time.perf_counter() - start)
    forward_s = _graph_replay_time(engine, batch)
    for i in range(batch):
        engine.abort_request(f"d{batch}-{i}")
    drain(engine)
    return statistics.median(times), forward_s


MIXED_DECODES, MIXED_CHUNK_TOKENS = 240, 256


def mixed_step_times(engine, SamplingParams, vocab: int, tiny: bool) -> dict[str, float]:
    """Median time of a step mixing MIXED_DECODES decodes (1k context) with one MIXED_CHUNK_TOKENS-token
    prompt, on each path the runner has: "graph" (a captured mixed step), "varlen" (eager, one varlen
    attention launch for the prompt) and "sdpa" (eager, SDPA for the prompt: the plain path).

    Paths are switched through the runner's own fields, for this measurement only.
    """
    runner = engine.runner
    num_decodes, chunk = (MIXED_DECODES, MIXED_CHUNK_TOKENS) if not tiny else (8, 32)
    num_steps = 20 if not tiny else 3
    params = SamplingParams(temperature=0, max_tokens=1_000, ignore_eos=True)  # outlasts every path's steps
    for i in range(num_decodes):
        engine.add_request(f"m-{i}", prompt_ids(CONTEXT_TOKENS, vocab, seed=i), params)
    scheduler = engine.scheduler
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in scheduler.running) or scheduler.waiting:
        engine.step()
    saved = runner._mixed_graph_sizes, runner._varlen_eager
    paths = {"graph": (saved[0], True), "varlen": ([], True), "sdpa": ([], False)}
    if not saved[0]:
        del paths["graph"]
    if engine.config.attention_backend != "triton":
        paths = {"sdpa": ([], False)}
    result = {}
    one_token = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    for name, (sizes, varlen) in paths.items():
        runner._mixed_graph_sizes, runner._varlen_eager = sizes, varlen
        times = []
        for step in range(num_steps + 3):  # 3 to warm up
            engine.add_request(f"m-{name}-{step}", prompt_ids(chunk, vocab, seed=10_000 + step), one_token)
            sync()
            start = time.perf_counter()
            engine.step()  # the decodes and the whole new prompt, which ends after its first token
            sync()
            times.append(time.perf_counter() - start)
        result[name] = statistics.median(times[3:])
        print(f"ours: mixed step ({num_decodes} decodes + a {chunk}-token prompt), {name}: {result[name] * 1e3:.2f} ms")
    runner._mixed_graph_sizes, runner._varlen_eager = saved
    for i in range(num_decodes):
        engine.abort_request(f"m-{i}")
    drain(engine)
    return result


def drain(engine) -> None:
    """Run the engine until idle (a step launched by the last call is collected) and check it freed every block."""
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.num_free_blocks() == engine.num_usable_blocks()


def _graph_replay_time(engine, batch: int) -> float | None:
    """GPU time of the captured decode forward alone (no scheduling, sampling or host work)."""
    graph = engine.runner._graph_for(batch)
    if graph is None:
        return None
    return _time(graph.graph.replay, repeats=20)


def _prefill(engine, SamplingParams, spec) -> dict:
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    times = []
    for rep in range(6):
        engine.add_request(f"p{rep}", prompt_ids(PREFILL_TOKENS, spec.vocab_size, seed=100 + rep), params)
        sync()
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        sync()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times[1:])
    linear_params = sum(
        p.numel()
        for n, p in engine.runner.model.named_parameters()
        if p.dim() == 2 and "embed_tokens" not in n and "lm_head" not in n
    )
    s, L, H, D = PREFILL_TOKENS, spec.num_layers, spec.num_heads, spec.head_dim
    flops = 2 * linear_params * s + 2 * spec.hidden_size * spec.vocab_size + L * 2 * s * s * H * D  # causal QK + PV
    print(f"ours: prefill {s} tokens: {step_s * 1e3:.1f} ms, {flops / step_s / 1e12:.0f} TFLOP/s")
    return {"tokens": s, "seconds": step_s, "flops": flops}


def _e2e_ours(engine, SamplingParams, vocab: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=E2E_OUTPUT_TOKENS, ignore_eos=True)
    prompts = [prompt_ids(CONTEXT_TOKENS, vocab, seed=1000 + i) for i in range(E2E_BATCH)]
    for rep in range(2):  # the first pass warms every shape up
        sync()
        start = time.perf_counter()
        for i, p in enumerate(prompts):
            engine.add_request(f"e{rep}-{i}", p, params)
        num_tokens = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                num_tokens += len(out.outputs[0].delta_token_ids)
        sync()
        elapsed = time.perf_counter() - start
    print(f"ours: e2e {E2E_BATCH} x ({CONTEXT_TOKENS} in, {E2E_OUTPUT_TOKENS} out): {num_tokens / elapsed:.0f} tok/s")
    return {"output_tokens": num_tokens, "seconds": elapsed}


# ------------------------------------------------------------------ transformers


def bench_hf(model_dir: str, tiny: bool) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(model_dir)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        print("hf: skipped (transformers sizes its continuous-batching cache from GPU memory)")
        return {}
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
    model.eval()
    gen = GenerationConfig(max_new_tokens=E2E_OUTPUT_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    prompts = [prompt_ids(CONTEXT_TOKENS, config.vocab_size, seed=1000 + i) for i in range(E2E_BATCH)]
    result = {}
    for _rep in range(2):
        sync()
        start = time.perf_counter()
        outputs = model.generate_batch(inputs=prompts, generation_config=gen)
        sync()
        elapsed = time.perf_counter() - start
        num_tokens = sum(len(o.generated_tokens) for o in outputs.values())
        result = {
            "output_tokens": num_tokens,
            "seconds": elapsed,
            "attn_implementation": model.config._attn_implementation,
        }
    print(f"hf: e2e {num_tokens / elapsed:.0f} tok/s with {result['attn_implementation']}")
    return result


# ------------------------------------------------------------------ report


def report(floors: dict, ours: dict, hf: dict | None) -> str:
    bw, mm = floors["copy_bandwidth_bytes_per_s"], floors["bf16_matmul_flops_per_s"]
    w, kvt = ours["weight_bytes_read_per_step"], ours["kv_bytes_per_token"]
    lines = [
        f"device: {floors['device']}; copy {bw / 1e12:.2f} TB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s",
        "| measure | figure | floor / ceiling | ratio | target |",
        "|---|---|---|---|---|",
    ]
    d1 = ours["decode"]["1"]["step_s"]
    floor1 = w / bw
    lines.append(
        f"| decode step, batch 1, 1k context | {d1 * 1e3:.2f} ms{_forward(ours, '1')} | {floor1 * 1e3:.2f} ms "
        f"(weight bytes / copy bw) | {d1 / floor1:.2f} x floor | <= 1.15 x |"
    )
    for b in ("64", "256"):
        step = ours["decode"][b]["step_s"]
        ceiling = int(b) / ((w + kvt * CONTEXT_TOKENS * int(b)) / bw)
        lines.append(
            f"| decode throughput, batch {b}, 1k context | {int(b) / step:.0f} tok/s "
            f"({step * 1e3:.2f} ms/step{_forward(ours, b)}) | {ceiling:.0f} tok/s "
            f"| {int(b) / step / ceiling:.0%} of ceiling | >= 70 % |"
        )
    p = ours["prefill"]
    rate = p["flops"] / p["seconds"]
    lines.append(
        f"| prefill, one {p['tokens']}-token prompt | {p['seconds'] * 1e3:.1f} ms, {rate / 1e12:.0f} TFLOP/s "
        f"| {mm / 1e12:.0f} TFLOP/s | {rate / mm:.0%} of matmul rate | >= 60 % |"
    )
    e = ours["e2e"]
    ours_tps = e["output_tokens"] / e["seconds"]
    if hf and hf.get("seconds"):
        hf_tps = hf["output_tokens"] / hf["seconds"]
        lines.append(
            f"| e2e {E2E_BATCH} x (1k in, {E2E_OUTPUT_TOKENS} out) vs transformers generate_batch "
            f"({hf['attn_implementation']}) | {ours_tps:.0f} tok/s | {hf_tps:.0f} tok/s | "
            f"{ours_tps / hf_tps:.1f} x | >= 3 x |"
        )
    return "\n".join(lines)


def _forward(ours: dict, batch: str) -> str:
    forward_s = ours["decode"][batch].get("graph_forward_s")
    return f"; forward alone {forward_s * 1e3:.2f} ms" if forward_s else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["floors", "ours", "hf"])
    parser.add_argument("--out")
    parser.add_argument("--model-dir", help="reuse a model directory (default: write Llama-3.1-8B's config)")
    parser.add_argument("--tiny", action="store_true", help="a tiny config, to check the script")
    parser.add_argument("--report", nargs="+", metavar="JSON", help="floors.json ours.json [hf.json]")
    args = parser.parse_args()
    if args.report:
        parts = [json.loads(Path(p).read_text()) for p in args.report]
        print(report(parts[0], parts[1], parts[2] if len(parts) > 2 else None))
        return
    model_dir = args.model_dir or write_model_dir(TINY if args.tiny else LLAMA_31_8B)
    if args.part == "floors":
        result = measure_floors(args.tiny)
    elif args.part == "ours":
        result = bench_ours(model_dir, args.tiny)
    else:
        result = bench_hf(model_dir, args.tiny)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
