"""Disaggregated against colocated serving on the same GPUs, through HTTP, measured by tristage-loadgen.

For each mode (`--mode colocated --replicas G` and `--mode disaggregated --prefill G/2 --decode G/2`,
G = the GPUs given):
  ttft4k   one 4096-token prompt at a time (16 output tokens): mean TTFT
  mixed    a Poisson load mixing short prompts with long ones (Mnemosyne's mixed workload), while
           others decode: p99 inter-token latency

    python benchmarks/disagg_serving.py --gpus 2 --out results/disagg.json
    python benchmarks/disagg_serving.py --tiny --gpus 2      # a tiny config on CPU, to check the script
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_models import LLAMA_31_8B, TINY, start_serve, write_model_dir

PORT = 8790


def loadgen(model_dir: str, out_dir: str, *args: str) -> dict:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "loadgen",
            "run",
            "--base-url",
            f"http://127.0.0.1:{PORT}",
            "--model",
            "bench",
            "--endpoint",
            "completions",
            "--tokenizer",
            model_dir,
            "--prompt-token-ids",
            "--no-progress",
            "--no-plots",
            "--out",
            out_dir,
            *args,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return json.loads(Path(out_dir, "summary.json").read_text())


def run_mode(model_dir: str, name: str, mode_args: list[str], sizes: dict, extra: list[str]) -> dict:
    serve = start_serve(model_dir, PORT, *mode_args, *extra)
    work = tempfile.mkdtemp(prefix=f"disagg-{name}-")
    try:
        ttft = loadgen(
            model_dir,
            f"{work}/ttft",
            "--workload",
            "random",
            "--input-len",
            str(sizes["long"]),
            "--output-len",
            "16",
            "--num-requests",
            str(sizes["ttft_requests"]),
            "--concurrency",
            "1",
        )
        mixed = loadgen(
            model_dir,
            f"{work}/mixed",
            "--workload",
            "long-context",
            "--input-len",
            str(sizes["short"]),
            "--long-input-len",
            str(sizes["long"]),
            "--long-fraction",
            "0.15",
            "--output-len",
            str(sizes["output"]),
            "--num-requests",
            str(sizes["mixed_requests"]),
            "--rate",
            str(sizes["rate"]),
            "--seed",
            "1",
        )
    finally:
        serve.terminate()
        serve.wait(120)
    result = {
        "ttft_4k_p50_s": ttft["ttft"]["p50"],
        "mixed_itl_p99_s": mixed["itl"]["p99"],
        "mixed_ttft_p50_s": mixed["ttft"]["p50"],
        "mixed_completed": mixed["completed"],
    }
    print(f"{name}: {result}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    model_dir = write_model_dir(TINY if args.tiny else LLAMA_31_8B)
    sizes = (
        dict(long=1024, short=64, output=16, ttft_requests=3, mixed_requests=12, rate=4)
        if args.tiny
        else dict(long=4096, short=256, output=128, ttft_requests=6, mixed_requests=120, rate=6)
    )
    extra = ["--device", "cpu"] if args.tiny else []
    half = max(1, args.gpus // 2)
    results = {
        "colocated": run_mode(
            model_dir, "colocated", ["--mode", "colocated", "--replicas", str(args.gpus)], sizes, extra
        ),
        "disaggregated": run_mode(
            model_dir,
            "disaggregated",
            ["--mode", "disaggregated", "--prefill", str(half), "--decode", str(half)],
            sizes,
            extra,
        ),
    }
    c, d = results["colocated"], results["disaggregated"]
    print(
        f"| GPUs {args.gpus} | TTFT 4k disaggregated / colocated = {d['ttft_4k_p50_s'] / c['ttft_4k_p50_s']:.2f} "
        f"(target <= 1.10) | p99 ITL mixed load disaggregated / colocated = "
        f"{d['mixed_itl_p99_s'] / c['mixed_itl_p99_s']:.2f} (target <= 0.5) |"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
