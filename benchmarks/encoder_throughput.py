"""An encode worker's image rate: megapixel JPEGs through `ImageEncoder` (decode, the model's own image
processor, the vision tower, the projector), with its preprocessing on 1 thread and on more.

LLaVA-1.5-7B shapes (CLIP ViT-L/14 at 336 px), dummy weights. Each batch holds distinct generated
JPEGs of 1, 2 and 4 megapixels in turn, so every image is a cache miss. Decoding and resizing a
megapixel JPEG costs far more than the tower, so the rate grows with the preprocessing threads
until the cores or the tower run out.

JPEGs are draft-decoded (at 1/2 .. 1/8 scale, services.workers.encoder) unless --no-image-draft-decode;
--pipeline-depth 2 starts each batch's preprocessing before the tower runs the batch ahead, as the
encode worker's loop does (1: one batch after the other).

    python benchmarks/encoder_throughput.py --device cuda --out $OUT/encoder.json
    python benchmarks/encoder_throughput.py --tiny          # a tiny tower on the CPU: preprocessing alone
    python benchmarks/encoder_throughput.py --tiny --no-image-draft-decode --pipeline-depth 1   # as before
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_models import LLAVA_15_7B, TINY_LLAVA, write_llava_dir

SIZES = [(1024, 1024), (2048, 1024), (2048, 2048)]  # 1, 2 and 4 megapixels


def jpegs(count: int, seed: int) -> list[bytes]:
    import numpy as np

    from loadgen.images import generate_image

    rng = np.random.default_rng(seed)
    urls = [generate_image(*SIZES[i % len(SIZES)], "jpeg", rng) for i in range(count)]
    return [base64.b64decode(url.partition(",")[2]) for url in urls]


def images_per_s(
    model_dir: str, device: str, threads: int, batches: list[list[bytes]], draft: bool = True, depth: int = 1
) -> float:
    """Images encoded per second over `batches`, each one start/finish (as the loop takes its queue), with
    up to `depth` batches started and not finished."""
    from collections import deque

    from services.common.images import encoded_content_hash
    from services.common.messages import ImageRef
    from services.workers.encoder import EncodeBatch, ImageEncoder

    encoder = ImageEncoder(
        model_dir,
        device,
        "bfloat16" if device != "cpu" else "float32",
        load_format="dummy",
        preprocess_threads=threads,
        image_draft_decode=draft,
    )
    num_rows = encoder.processor.num_image_tokens(336, 336)

    def items(batch: list[bytes]) -> list[tuple[ImageRef, bytes]]:
        return [(ImageRef(content_hash=encoded_content_hash(data), offset=0, length=num_rows), data) for data in batch]

    def finish(started: EncodeBatch) -> None:
        results = encoder.finish(started)
        assert all(not isinstance(r, str) for r in results), results

    encoder.encode(items(jpegs(2, seed=99)))  # warm-up: allocator, kernels, thread start
    start = time.perf_counter()
    in_flight: deque[EncodeBatch] = deque()
    for batch in batches:
        in_flight.append(encoder.start(items(batch)))
        if len(in_flight) == depth:
            finish(in_flight.popleft())
    while in_flight:
        finish(in_flight.popleft())
    if device != "cpu":
        import torch

        torch.cuda.synchronize()
    return sum(map(len, batches)) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny tower (the image processor is unchanged)")
    parser.add_argument("--images", type=int, default=48, help="images timed per thread count")
    parser.add_argument("--batch", type=int, default=8, help="images per encode call")
    parser.add_argument(
        "--threads", default=f"1,{min(8, os.cpu_count() or 1)}", help="preprocessing thread counts to compare"
    )
    parser.add_argument("--no-image-draft-decode", action="store_true", help="decode every JPEG in full")
    parser.add_argument("--pipeline-depth", type=int, default=2, help="batches started and not finished (1: serial)")
    parser.add_argument("--out")
    args = parser.parse_args()
    model_dir = write_llava_dir(TINY_LLAVA if args.tiny else LLAVA_15_7B)
    images = jpegs(args.images, seed=1)
    batches = [images[i : i + args.batch] for i in range(0, len(images), args.batch)]
    counts = [int(t) for t in args.threads.split(",")]
    draft, depth = not args.no_image_draft_decode, args.pipeline_depth
    rates = {threads: images_per_s(model_dir, args.device, threads, batches, draft, depth) for threads in counts}
    base = rates[counts[0]]
    for threads, rate in rates.items():
        print(f"| {threads} threads | {rate:.1f} images/s | {rate / base:.2f} x |", flush=True)
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "device": args.device,
                    "tiny": args.tiny,
                    "batch": args.batch,
                    "image_draft_decode": draft,
                    "pipeline_depth": depth,
                    "images_per_s": rates,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
