"""KV transfer between two processes on one host: effective GB/s of the prefill -> decode path.

The parent process prefills one prompt on its engine (holding the KV), then ships it with the
production sender (services.workers.kv_transfer) to a decode worker running in a child process
(the production EngineWorker loop). The clock runs from the first byte sent to the decode worker's
acknowledgement, which it sends once every layer is written into its own paged cache.

    python benchmarks/kv_transfer.py                 # Llama-3.1-8B shapes, bf16, 4096-token prompt
    python benchmarks/kv_transfer.py --tiny          # a tiny config, to check the script
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_models import LLAMA_31_8B, TINY, write_model_dir  # noqa: E402

ENGINE = dict(load_format="dummy", gpu_memory_utilization=0.4, max_num_batched_tokens=8192, max_model_len=8192,
              enable_cuda_graphs=False)


def decode_worker(model_dir: str, ready, stop) -> None:
    from services.engine import LLMEngine
    from services.workers.engine_worker import EngineWorker

    worker = EngineWorker(LLMEngine(model=model_dir, **ENGINE), "tcp://127.0.0.1:0", "decode-0", role="decode",
                          model_name="bench")
    ready.put((worker.input_address, worker.kv_address))
    import threading

    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    stop.wait()
    worker.stop()
    thread.join(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--prompt-tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    model_dir = write_model_dir(TINY if args.tiny else LLAMA_31_8B)

    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    child = ctx.Process(target=decode_worker, args=(model_dir, ready, stop))
    child.start()
    try:
        result = run_sender(model_dir, ready.get(timeout=600), args.prompt_tokens, args.repeats)
    finally:
        stop.set()
        child.join(60)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


def run_sender(model_dir: str, addresses: tuple[str, str], num_tokens: int, repeats: int) -> dict:
    import zmq

    from services.common.channels import bind, configure
    from services.common.codec import MessageCodec
    from services.common.messages import KVTransfer, SamplingSpec, WorkerInbound
    from services.engine import LLMEngine, SamplingParams
    from services.workers.kv_transfer import KVSender, TransferStats, engine_layout

    engine = LLMEngine(model=model_dir, **ENGINE)
    context = zmq.Context()
    acks = configure(context.socket(zmq.PULL))
    ack_to = bind(acks, "tcp://127.0.0.1:0")
    outputs = configure(context.socket(zmq.PULL))
    reply_to = bind(outputs, "tcp://127.0.0.1:0")
    stats = TransferStats()
    sender = KVSender(engine, context, engine_layout(engine, "bench"), ack_to, stats=stats)
    codec = MessageCodec(WorkerInbound)
    seconds = []
    for rep in range(repeats + 1):
        rid = f"r{rep}"
        prompt = [(rep * 7919 + i * 31) % 1000 + 10 for i in range(num_tokens)]
        engine.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=1), hold_kv=True)
        first = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                first = out.outputs[0].token_ids
        transfer = KVTransfer(request_id=rid, layout=sender.layout, prompt_token_ids=prompt, output_token_ids=first,
                              sampling=SamplingSpec(temperature=0, max_tokens=2, ignore_eos=True), reply_to=reply_to,
                              ack_to=ack_to)
        bytes_before = stats.bytes_sent
        start = time.perf_counter()
        sender.send(transfer, addresses[1])
        ack = codec.decode(acks.recv_multipart())
        elapsed = time.perf_counter() - start
        assert ack.accepted, ack
        sender.on_ack(ack)
        if rep > 0:  # the first transfer warms both ends up
            seconds.append(elapsed)
        num_bytes = stats.bytes_sent - bytes_before
    median = statistics.median(seconds)
    return {"prompt_tokens": num_tokens, "bytes": num_bytes, "seconds_median": median,
            "gb_per_s": num_bytes / median / 1e9, "repeats": repeats}


if __name__ == "__main__":
    main()
