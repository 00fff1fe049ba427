"""Multimodal serving: EPD (encode, prefill, decode on their own workers) against colocated on the same GPUs.

Both run LLaVA-1.5-7B shapes (dummy weights) through HTTP. For each mode, `tristage-loadgen` sends
chats carrying `--images` generated JPEG images of 1 to 4 megapixels each, over a Poisson rate sweep,
and records TTFT and throughput. Then, on the EPD cluster, sequential requests whose image the
encoder already holds (unique text before it, so the prefix cache cannot help) are timed against
text-only requests of the same prompt length, with the image uploaded again and named by its uuid.

    python benchmarks/epd_serving.py --gpus 2 --out $OUT/epd.json
    python benchmarks/epd_serving.py --tiny --gpus 2      # a tiny config on CPU, to check the script
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_models import LLAVA_15_7B, TINY_LLAVA, _word, start_serve, write_llava_dir

PORT = 8792
SIZES = "1024x1024,2048x1024,2048x2048"  # 1, 2 and 4 megapixels


def loadgen(out_dir: str, rate: float, num_requests: int, images: int, output_len: int) -> dict:
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
            "chat",
            "--workload",
            "multimodal",
            "--input-len",
            "32",
            "--images-per-request",
            str(images),
            "--image-size",
            SIZES,
            "--output-len",
            str(output_len),
            "--num-requests",
            str(num_requests),
            "--rate",
            str(rate),
            "--seed",
            "3",
            "--no-progress",
            "--no-plots",
            "--out",
            out_dir,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return json.loads(Path(out_dir, "summary.json").read_text())


def scrape_sums() -> dict[str, float]:
    """The gateway's running totals this benchmark reads: TTFT parts (sum and count per part) and the
    KV transfers that waited for staging room."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{PORT}/metrics", timeout=30).text
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("tristage:ttft_part_seconds_sum", "tristage:ttft_part_seconds_count"):
                key = f"{sample.labels['part']}_{sample.name.rsplit('_', 1)[1]}"
                sums[key] = sums.get(key, 0.0) + sample.value
            elif sample.name == "tristage:kv_transfer_staging_waits_total":
                sums["staging_waits"] = sums.get("staging_waits", 0.0) + sample.value
    return sums


def mean_parts_ms(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean milliseconds of each TTFT part over the requests between two scrapes, and staging waits."""
    parts: dict[str, float] = {}
    for key in after:
        if key.endswith("_count") and after[key] > before.get(key, 0.0):
            part = key[: -len("_count")]
            count = after[key] - before.get(key, 0.0)
            parts[part] = round(1e3 * (after[f"{part}_sum"] - before.get(f"{part}_sum", 0.0)) / count, 1)
    parts["staging_waits"] = after.get("staging_waits", 0.0) - before.get("staging_waits", 0.0)
    return parts


def ttft_s(client: httpx.Client, content) -> tuple[float, int]:
    """(time to the first token, prompt tokens) of one streamed chat."""
    start = time.perf_counter()
    first = None
    usage = 0
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": "bench",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
            if event.get("usage"):
                usage = event["usage"]["prompt_tokens"]
    return first if first is not None else time.perf_counter() - start, usage


def cached_vs_text(repeats: int) -> dict:
    """TTFT of a request whose image embedding is cached against a text-only one of the same length."""
    import numpy as np

    from loadgen.images import generate_image

    image = generate_image(2048, 2048, "jpeg", np.random.default_rng(5))
    counter = iter(range(10**9))

    def words(n: int) -> str:  # words never sent before: no prefix-cache hit (one token each)
        return " ".join(_word(1000 + next(counter)) for _ in range(n))

    uploaded = {"type": "image_url", "image_url": {"url": image}, "uuid": "bench-image"}
    named = {"type": "image_url", "image_url": None, "uuid": "bench-image"}  # the client uploads it only once
    with httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=120) as client:
        _, image_tokens = ttft_s(client, [{"type": "text", "text": words(8)}, uploaded])
        _, one_word = ttft_s(client, words(1))
        cached, by_uuid, text = [], [], []
        for _ in range(repeats):
            t, n = ttft_s(client, [{"type": "text", "text": words(8)}, uploaded])
            cached.append(t)
            t, u = ttft_s(client, [{"type": "text", "text": words(8)}, named])
            by_uuid.append(t)
            t, m = ttft_s(client, words(image_tokens - one_word + 1))
            text.append(t)
            assert n == u == m == image_tokens, (n, u, m, image_tokens)
    return {
        "prompt_tokens": image_tokens,
        "data_url_chars": len(image),
        "cached_image_ttft_p50_s": statistics.median(cached),
        "cached_image_by_uuid_ttft_p50_s": statistics.median(by_uuid),
        "text_only_ttft_p50_s": statistics.median(text),
    }


def run_mode(
    model_dir: str, name: str, mode_args: list[str], extra: list[str], rates: list[float], sizes: dict
) -> dict:
    serve = start_serve(model_dir, PORT, *mode_args, *extra)
    work = tempfile.mkdtemp(prefix=f"epd-{name}-")
    try:
        loadgen(f"{work}/warm", 1, 2, sizes["images"], 4)
        sweep = {}
        for rate in rates:
            before = scrape_sums()
            s = loadgen(f"{work}/r{rate}", rate, sizes["requests"], sizes["images"], sizes["output"])
            sweep[str(rate)] = {
                "ttft_parts_mean_ms": mean_parts_ms(before, scrape_sums()),
                "ttft_p50_s": s["ttft"]["p50"],
                "ttft_p99_s": s["ttft"]["p99"],
                "request_throughput": s["request_throughput"],
                "output_token_throughput": s["output_token_throughput"],
                "completed": s["completed"],
                "errors": s["errors"],
            }
            print(f"{name} rate {rate}: {sweep[str(rate)]}", flush=True)
        result = {"sweep": sweep}
        if name == "epd":
            result["cached"] = cached_vs_text(sizes["repeats"])
            print(f"{name} cached: {result['cached']}", flush=True)
    finally:
        serve.terminate()
        serve.wait(120)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--rates", default="2,4,8")
    parser.add_argument("--images", type=int, default=2, help="images per request")
    parser.add_argument(
        "--encode",
        type=int,
        default=2,
        help="encode workers of the EPD cluster (they share the GPUs with the prefill and the decode worker)",
    )
    parser.add_argument("--epd-only", action="store_true", help="skip colocated (a rerun of the EPD side)")
    parser.add_argument("--repeats", type=int, default=None, help="timed cached/text-only pairs (default 8; 2 tiny)")
    parser.add_argument("--out")
    args = parser.parse_args()
    model_dir = write_llava_dir(TINY_LLAVA if args.tiny else LLAVA_15_7B)
    sizes = dict(
        images=args.images,
        requests=8 if args.tiny else 48,
        output=8 if args.tiny else 32,
        repeats=args.repeats or (2 if args.tiny else 8),
    )
    extra = ["--device", "cpu"] if args.tiny else []
    rates = [float(r) for r in args.rates.split(",")]
    results = {"images_per_request": args.images, "image_sizes": SIZES, "encode_workers": args.encode}
    if not args.epd_only:
        results["colocated"] = run_mode(
            model_dir, "colocated", ["--mode", "colocated", "--replicas", str(args.gpus)], extra, rates, sizes
        )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    results["epd"] = run_mode(
        model_dir,
        "epd",
        ["--mode", "disaggregated", "--encode", str(args.encode), "--prefill", "1", "--decode", "1"],
        extra,
        rates,
        sizes,
    )
    for rate in map(str, rates) if "colocated" in results else ():
        c, e = results["colocated"]["sweep"][rate], results["epd"]["sweep"][rate]
        print(
            f"| {rate} req/s | colocated TTFT p50 {c['ttft_p50_s'] * 1e3:.0f} ms | EPD {e['ttft_p50_s'] * 1e3:.0f} ms "
            f"| ratio {e['ttft_p50_s'] / c['ttft_p50_s']:.2f} | throughput {c['request_throughput']:.2f} / "
            f"{e['request_throughput']:.2f} req/s |"
        )
    cached = results["epd"]["cached"]
    print(
        f"cached image TTFT / text-only TTFT at {cached['prompt_tokens']} tokens: uploaded again "
        f"{cached['cached_image_ttft_p50_s'] / cached['text_only_ttft_p50_s']:.2f}, named by uuid "
        f"{cached['cached_image_by_uuid_ttft_p50_s'] / cached['text_only_ttft_p50_s']:.2f}"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
