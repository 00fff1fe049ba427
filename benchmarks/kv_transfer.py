"""KV transfer between two processes on one host: effective GB/s of the prefill -> decode path.

The parent process prefills one prompt on its engine (holding the KV), then ships it with the
production sender (services.workers.kv_transfer) to a decode worker running in a child process
(the production EngineWorker loop). The clock runs from the first byte sent to the decode worker's
acknowledgement, which it sends once every layer is in its own paged cache on its GPU. With two
GPUs visible the decode worker gets the second one, as in a deployment.

Each delivery of services.workers.kv_transfer is measured in the same run:
  shared memory   same host: pinned shared-memory staging, only references cross the socket
  frames          the bytes as ZeroMQ frames from the pinned staging (KV_STREAMS connections)
  plain           no staging: pageable host copies and frames (the first version's path)

    python benchmarks/kv_transfer.py                 # Llama-3.1-8B shapes, bf16, 4096-token prompt
    python benchmarks/kv_transfer.py --tiny          # a tiny config, to check the script
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_models import LLAMA_31_8B, TINY, write_model_dir

ENGINE = dict(
    load_format="dummy",
    gpu_memory_utilization=0.4,
    max_num_batched_tokens=8192,
    max_model_len=8192,
    enable_cuda_graphs=False,
)
DELIVERIES = ("shared memory", "frames", "plain")


def decode_worker(model_dir: str, ready, stop, peers, registered) -> None:
    """The decode worker, in its own process; it connects only to the addresses the sender registers
    through `peers` (as a gateway does over Ray), each acknowledged on `registered`."""
    import threading

    from services.engine import LLMEngine
    from services.workers.engine_worker import EngineWorker

    worker = EngineWorker(
        LLMEngine(model=model_dir, **ENGINE), "tcp://127.0.0.1:0", "decode-0", role="decode", model_name="bench"
    )
    ready.put((worker.input_address, worker.kv_address, worker.host_id))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()

    def register() -> None:
        while True:
            worker.peers.register(peers.get())
            registered.put(True)

    threading.Thread(target=register, daemon=True).start()
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

    import torch

    ctx = mp.get_context("spawn")
    ready, stop, peers, registered = ctx.Queue(), ctx.Event(), ctx.Queue(), ctx.Queue()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if torch.cuda.is_available() and torch.cuda.device_count() > 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = "1"  # the child's GPU; the parent keeps cuda:0
    child = ctx.Process(target=decode_worker, args=(model_dir, ready, stop, peers, registered))
    child.start()
    if visible is None:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
    try:
        target = ready.get(timeout=600)
        results = {
            delivery: run_sender(model_dir, target, delivery, args.prompt_tokens, args.repeats, (peers, registered))
            for delivery in DELIVERIES
        }
    finally:
        stop.set()
        child.join(60)
    results["gpus"] = min(2, torch.cuda.device_count()) if torch.cuda.is_available() else 0
    print(json.dumps(results, indent=1))
    for delivery in DELIVERIES:
        r = results[delivery]
        print(
            f"| {delivery} | {r['bytes']:,} | {r['seconds_median'] * 1e3:.1f} ms | {r['gb_per_s']:.2f} GB/s | "
            f"{r['gb_per_s'] / results['plain']['gb_per_s']:.1f} x plain |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


def run_sender(
    model_dir: str, target: tuple[str, str, str], delivery: str, num_tokens: int, repeats: int, registration
) -> dict:
    import zmq

    from services.common.channels import bind, configure
    from services.common.codec import MessageCodec
    from services.common.messages import (
        DataPlanePeers,
        GenerateRequest,
        KVTarget,
        KVTransfer,
        SamplingSpec,
        WorkerInbound,
    )
    from services.engine import LLMEngine, SamplingParams
    from services.workers.kv_sender import KVSender
    from services.workers.kv_staging import host_identity
    from services.workers.kv_transfer import TransferStats, engine_layout
    from services.workers.roles import open_staging

    engine = LLMEngine(model=model_dir, **ENGINE)
    cuda = engine.runner.device.type == "cuda"
    context = zmq.Context(io_threads=4)
    acks = configure(context.socket(zmq.PULL))
    ack_to = bind(acks, "tcp://127.0.0.1:0")
    outputs = configure(context.socket(zmq.PULL))
    reply_to = bind(outputs, "tcp://127.0.0.1:0")
    peers, registered = registration  # the decode worker acks and streams only where it was told to
    peers.put(DataPlanePeers(reply_address=reply_to, input_addresses=[ack_to]))
    registered.get(timeout=60)
    stats = TransferStats()
    staging = None if delivery == "plain" else open_staging(2**30 if cuda else 64 * 2**20, pin=cuda)
    host_id = host_identity()
    sender = KVSender(
        engine, context, engine_layout(engine, "bench"), ack_to, stats=stats, staging=staging, host_id=host_id
    )
    kv_target = KVTarget(
        worker="decode-0", kv_address=target[1], host_id=target[2] if delivery == "shared memory" else "another-host"
    )
    codec = MessageCodec(WorkerInbound)
    seconds = []
    try:
        for rep in range(repeats + 1):
            rid = f"{delivery}-{rep}"
            prompt = [(rep * 7919 + i * 31) % 1000 + 10 for i in range(num_tokens)]
            engine.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=1), hold_kv=True)
            first = None
            while engine.has_unfinished_requests():
                for out in engine.step():
                    first = out.outputs[0].token_ids
            if cuda:
                import torch

                torch.cuda.synchronize()
            request = GenerateRequest(
                request_id=rid,
                prompt_token_ids=prompt,
                output_token_ids=first,
                sampling=SamplingSpec(temperature=0, max_tokens=2, ignore_eos=True),
                reply_to=reply_to,
            )
            transfer = KVTransfer(request=request, layout=sender.layout, ack_to=ack_to)
            bytes_before = stats.bytes_sent
            start = time.perf_counter()
            sender.send(transfer, kv_target)
            while not acks.poll(0):  # the worker loop's turn: send what is staged
                sender.poll()
            ack = codec.decode(acks.recv_multipart())
            elapsed = time.perf_counter() - start
            assert ack.accepted, ack
            sender.on_ack(ack)
            if rep > 0:  # the first transfer warms both ends up
                seconds.append(elapsed)
            num_bytes = stats.bytes_sent - bytes_before
            while outputs.poll(200):  # the decode worker's tokens for this request
                outputs.recv_multipart()
    finally:
        sender.close()
        if staging is not None:
            staging.close()
        for socket in (acks, outputs):
            socket.close()
        context.term()
    median = statistics.median(seconds)
    return {
        "prompt_tokens": num_tokens,
        "bytes": num_bytes,
        "seconds_median": median,
        "gb_per_s": num_bytes / median / 1e9,
        "repeats": repeats,
    }


if __name__ == "__main__":
    main()
