"""The `tristage` command.

tristage serve                   a whole cluster on this machine behind an OpenAI-compatible API
tristage generate [PROMPT ...]   run the offline engine on prompts (default: the embedded model)
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from services.engine.config import DTYPES, SMALL_BATCH_LINEAR_KERNELS, EngineConfig
from services.engine.waiting_queue import SCHEDULING_POLICIES
from services.gateway.config import TOOL_CALL_PARSER_OPTIONS
from services.gateway.hosts import default_allowed_hosts
from services.gateway.images import ImagePolicy
from services.router.policies.base import DEFAULT_HOST_TIER_HIT_WEIGHT
from services.router.router import POLICIES as ROUTER_POLICIES
from services.workers.gpu_memory import DEFAULT_DECODE_KV_SHARE, ROLES


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="HF-format model directory or Hugging Face Hub id (org/name), fetched once per node into the Hub's "
        "cache ($HF_HOME; $HF_HUB_OFFLINE=1: the cache only; $HF_TOKEN for gated repos; default: the embedded "
        "tiny model)",
    )
    parser.add_argument("--revision", default=None, help="the Hub id's branch, tag or commit (default: main)")
    parser.add_argument(
        "--download-dir", default=None, help="the Hub cache to fetch into (default: $HF_HUB_CACHE or $HF_HOME/hub)"
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory or Hub id (default: the model's)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)])
    parser.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument(
        "--max-prefill-tokens-beside-decodes",
        type=int,
        default=512,
        help="prefill tokens of a step that also decodes, at most (default 512: bounds the gap between a "
        "stream's tokens while prompts arrive; 0: the step's whole budget)",
    )
    parser.add_argument(
        "--scheduling-policy",
        choices=list(SCHEDULING_POLICIES),
        default="fcfs",
        help="order of admitting waiting requests: arrival (fcfs, default), or Preble's priority groups "
        "by prefix-cache hit ratio (preble)",
    )
    parser.add_argument(
        "--ttft-slo-ms",
        type=float,
        default=None,
        help="time-to-first-token SLO: waiting requests are admitted least slack first (default: off)",
    )
    parser.add_argument(
        "--tpot-slo-ms",
        type=float,
        default=None,
        help="time-per-output-token SLO: a prompt chunk joins a step that decodes only while the step's "
        "predicted time stays within it (default: off)",
    )
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument(
        "--num-kv-blocks",
        type=int,
        default=None,
        help="KV-cache blocks of each engine, exactly (default: what --gpu-memory-utilization leaves)",
    )
    parser.add_argument(
        "--kv-offloading-size",
        type=float,
        default=0.0,
        metavar="GIB",
        help="GiB of host memory (pinned on CUDA) per engine for a host tier under the prefix cache: blocks the "
        "device evicts are kept there and copied back on a hit instead of recomputed (default 0: off)",
    )
    parser.add_argument(
        "--mixed-cuda-graph-max-tokens",
        type=int,
        default=2048,
        help="steps mixing prefill and decode up to this many tokens replay a CUDA graph; 0: run them eagerly",
    )
    parser.add_argument(
        "--prefill-attention",
        choices=["varlen", "sdpa"],
        default="varlen",
        help="eager prefill chunks: one varlen Triton launch for all (default) or one SDPA call each",
    )
    parser.add_argument(
        "--small-batch-linear",
        choices=list(SMALL_BATCH_LINEAR_KERNELS),
        default=EngineConfig.small_batch_linear,
        help="matrix products of 1..16 rows with the triton attention backend: the skinny Triton kernel "
        "(triton, default: the batch-1 decode step 0.88x torch's on an H100) or F.linear (torch)",
    )
    parser.add_argument(
        "--no-overlap-outputs",
        action="store_true",
        help="build a step's outputs before launching the next step (default: while it runs)",
    )
    parser.add_argument(
        "--no-async-scheduling",
        action="store_true",
        help="collect a step's tokens before launching the next (default: launch first, with overlapped outputs)",
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        revision=args.revision,
        download_dir=args.download_dir,
        tokenizer=args.tokenizer,
        device=args.device,
        dtype=args.dtype,
        load_format=args.load_format,
        block_size=args.block_size,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        max_prefill_tokens_beside_decodes=args.max_prefill_tokens_beside_decodes or None,
        scheduling_policy=args.scheduling_policy,
        ttft_slo_ms=args.ttft_slo_ms,
        tpot_slo_ms=args.tpot_slo_ms,
        max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching,
        gpu_memory_utilization=args.gpu_memory_utilization,
        num_kv_blocks=args.num_kv_blocks,
        kv_offloading_size=args.kv_offloading_size,
        mixed_cuda_graph_max_tokens=args.mixed_cuda_graph_max_tokens,
        varlen_prefill_attention=args.prefill_attention == "varlen",
        small_batch_linear=args.small_batch_linear,
        overlap_outputs=not args.no_overlap_outputs,
        async_scheduling=not args.no_async_scheduling,
    )


def _generate(args: argparse.Namespace) -> int:
    from services.common.errors import ModelLoadError
    from services.engine import LLM, SamplingParams

    config = engine_config_from_args(args)
    start = time.perf_counter()
    try:
        llm = LLM(**{k: v for k, v in vars(config).items()})
    except ModelLoadError as exc:  # a missing or refused model: its message, not a traceback
        raise SystemExit(f"tristage generate: {exc}") from exc
    print(
        f"model {llm.engine.model_dir} loaded on {llm.engine.config.device} "
        f"({llm.engine.config.dtype}) in {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    prompts = args.prompts or ["Hello! Tell me about the three stages of serving."]
    start = time.perf_counter()
    if args.chat:
        outputs = [llm.chat([{"role": "user", "content": p}], params) for p in prompts]
    else:
        outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    num_tokens = 0
    for prompt, output in zip(prompts, outputs):
        completion = output.outputs[0]
        num_tokens += len(completion.token_ids)
        print(
            f"--- prompt: {prompt!r}\n{completion.text}\n[{len(completion.token_ids)} tokens, "
            f"finish_reason={completion.finish_reason}]"
        )
    print(f"{len(outputs)} requests, {num_tokens} tokens in {elapsed:.2f} s", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    """A cluster that starts its own Ray runs under services.supervisor (nothing outlives the command,
    SIGKILL included; Ray bound to loopback with a loopback data plane). Joined to a Ray cluster, the
    actors are the cluster's and must outlive this gateway: no supervisor."""
    from services.supervisor import local_ray_environ, supervise

    if args.ray_address is not None:
        return _run_server(args)
    return supervise(lambda: _run_server(args), local_ray_environ(args.data_plane_host))


def _run_server(args: argparse.Namespace) -> int:
    from services import serve

    config = serve.ServeConfig(
        engine=engine_config_from_args(args),
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        mode=args.mode,
        replicas=args.replicas,
        num_prefill=args.prefill,
        num_decode=args.decode,
        num_encode=args.encode,
        router_policy=args.router_policy,
        host_tier_hit_weight=args.host_tier_hit_weight,
        data_plane_host=args.data_plane_host,
        data_plane_auth=args.data_plane_auth,
        cluster_secret=_cluster_secret(args.cluster_secret_file),
        stage_resources=args.ray_address is not None,
        worker_metrics_port=args.worker_metrics_port,
        kv_staging_bytes=None if args.kv_staging_mib is None else args.kv_staging_mib * 2**20,
        image_draft_decode=not args.no_image_draft_decode,
        decode_kv_share=args.decode_kv_share,
        role_gpu_memory_utilization=tuple(args.role_gpu_memory_utilization),
        ray_address=args.ray_address,
        api_keys=serve.api_keys_from(args.api_key),
        drain_timeout_s=args.drain_timeout,
        gateway_options={
            "max_queued_requests": args.max_queued_requests,
            "max_queued_sequences": args.max_queued_sequences,
            "max_queued_tokens": args.max_queued_tokens,
            "max_queued_prompt_bytes": args.max_queued_prompt_mib * 2**20,
            "max_connections": args.max_connections,
            "header_read_timeout_s": args.header_read_timeout_s,
            "keep_alive_timeout_s": args.keep_alive_timeout_s,
            "allowed_hosts": allowed_hosts_from(args.allowed_hosts, args.host),
            "image_policy": ImagePolicy(allowed_hosts=tuple(args.image_url_allow_host)),
            "image_reference_cache_bytes": args.image_reference_cache_mib * 2**20,
            "body_read_timeout_s": args.body_read_timeout_s,
            "tokenizer_threads": args.tokenizer_threads,
            "protect_metrics_and_docs": args.protect_metrics_and_docs,
            "tool_call_parser": args.tool_call_parser,
        },
    )
    return serve.run(config)


def role_fraction(arg: str) -> tuple[str, float]:
    """--role-gpu-memory-utilization's ROLE=FRACTION."""
    role, sep, value = arg.partition("=")
    try:
        fraction = float(value)
    except ValueError:
        fraction = float("nan")
    if not sep or role not in ROLES or not 0.0 < fraction <= 1.0:
        roles = ", ".join(ROLES)
        raise argparse.ArgumentTypeError(f"expected ROLE=FRACTION, ROLE one of {roles} and 0 < FRACTION <= 1")
    return role, fraction


def unit_weight(arg: str) -> float:
    """A weight in [0, 1] (--host-tier-hit-weight)."""
    try:
        weight = float(arg)
    except ValueError:
        weight = float("nan")
    if not 0.0 <= weight <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {arg!r}")
    return weight


def allowed_hosts_from(arg: str | None, bind_host: str) -> tuple[str, ...] | None:
    """--allowed-hosts as a tuple; without it, the loopback names when binding loopback, else any host."""
    if arg is None:
        return default_allowed_hosts(bind_host)
    return tuple(name.strip() for name in arg.split(",") if name.strip())


def _cluster_secret(secret_file: str | None):
    """The data plane's cluster secret as given: --cluster-secret-file, else $TRISTAGE_CLUSTER_SECRET."""
    import os

    from services.common.security import load_cluster_secret

    try:
        return load_cluster_secret(os.environ, secret_file)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"tristage serve: {exc}") from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tristage", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="run the offline engine on prompts")
    gen.add_argument("prompts", nargs="*", help="prompts (default: one example prompt)")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    _add_engine_args(gen)
    gen.set_defaults(func=_generate)

    srv = sub.add_parser("serve", help="start a local cluster behind an OpenAI-compatible API")
    srv.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default loopback only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument(
        "--served-model-name", default=None, help="API model name (default: a Hub id as given, a directory's name)"
    )
    srv.add_argument(
        "--mode",
        default="disaggregated",
        choices=["disaggregated", "colocated"],
        help="separate prefill and decode pools (default), or one pool doing both",
    )
    srv.add_argument("--replicas", type=int, default=1, help="colocated engine actors")
    srv.add_argument("--prefill", type=int, default=1, help="prefill actors (disaggregated)")
    srv.add_argument("--decode", type=int, default=1, help="decode actors (disaggregated)")
    srv.add_argument(
        "--encode",
        type=int,
        default=None,
        help="encode actors for a vision-language model (default: 1 disaggregated, 0 colocated)",
    )
    srv.add_argument(
        "--no-image-draft-decode",
        action="store_true",
        help="decode every JPEG in full on the workers that encode images (default: at 1/2 .. 1/8 scale "
        "where the model's image processor shrinks it anyway)",
    )
    srv.add_argument(
        "--decode-kv-share",
        type=float,
        default=DEFAULT_DECODE_KV_SHARE,
        help="where workers of several roles share a GPU, decode's part of the KV room prefill and decode "
        f"split after the encoders' needs and both models' weights (default {DEFAULT_DECODE_KV_SHARE}: 4 to 1)",
    )
    srv.add_argument(
        "--role-gpu-memory-utilization",
        type=role_fraction,
        action="append",
        default=[],
        metavar="ROLE=FRACTION",
        help="every actor of ROLE (encode, prefill, decode, colocated) may use FRACTION of its GPU's memory, "
        "in place of its planned share (repeatable)",
    )
    srv.add_argument(
        "--image-url-allow-host",
        action="append",
        default=[],
        help="a host http(s) image URLs may come from (repeatable; default none: data URLs only)",
    )
    srv.add_argument(
        "--image-reference-cache-mib",
        type=int,
        default=256,
        help="the gateway keeps images sent with a uuid, so a later request can name one by its uuid "
        "alone and not upload it again (default 256 MiB; 0: off)",
    )
    srv.add_argument(
        "--router-policy", default="preble", choices=list(ROUTER_POLICIES), help="prefill placement (default preble)"
    )
    srv.add_argument(
        "--host-tier-hit-weight",
        type=unit_weight,
        default=DEFAULT_HOST_TIER_HIT_WEIGHT,
        metavar="W",
        help="what the router counts a prompt token cached on a worker's host KV tier (--kv-offloading-size) "
        f"as worth, against one cached on its device, in [0, 1] (default {DEFAULT_HOST_TIER_HIT_WEIGHT})",
    )
    srv.add_argument(
        "--worker-metrics-port",
        type=int,
        default=None,
        help="workers serve their own /metrics from this port on (the gateway then exports none of "
        "their series); default: the gateway exports them all",
    )
    srv.add_argument(
        "--data-plane-host",
        default="127.0.0.1",
        help="address ZeroMQ sockets bind to; 'auto' = this Ray node's IP (multi-host)",
    )
    srv.add_argument(
        "--data-plane-auth",
        default="auto",
        choices=["auto", "on", "off"],
        help="CURVE authentication between gateway and workers on ZeroMQ (keys derived from the cluster "
        "secret); auto (default): on unless --data-plane-host is loopback",
    )
    srv.add_argument(
        "--cluster-secret-file",
        default=None,
        help="file holding the cluster secret (default: $TRISTAGE_CLUSTER_SECRET; without either, a run "
        "that starts its own Ray makes one, and one joining --ray-address with authentication on refuses)",
    )
    srv.add_argument(
        "--kv-staging-mib",
        type=int,
        default=None,
        help="each prefill worker's shared-memory buffer for outgoing KV (same-host transfers read "
        "it in place; default 4096 on a GPU, 64 on the CPU; a transfer that finds it full waits for room); "
        "0 sends KV through plain host copies",
    )
    srv.add_argument("--ray-address", default=None, help="join an existing Ray cluster")
    srv.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="accepted API key (repeatable; default: $TRISTAGE_API_KEYS, else no auth)",
    )
    srv.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    srv.add_argument(
        "--max-queued-requests", type=int, default=4096, help="requests waiting for their first token (429 above)"
    )
    srv.add_argument(
        "--max-queued-sequences",
        type=int,
        default=16384,
        help="sequences (n x prompts) waiting for their first token (429 above; default 16384)",
    )
    srv.add_argument("--max-queued-tokens", type=int, default=2**21, help="prompt tokens waiting for their first token")
    srv.add_argument(
        "--max-queued-prompt-mib",
        type=int,
        default=16,
        help="MiB of prompt text admitted and waiting to be tokenized (429 above; default 16)",
    )
    srv.add_argument(
        "--max-connections",
        type=int,
        default=2048,
        help="HTTP connections served at once; one more gets a 503 with Retry-After and is closed (default 2048)",
    )
    srv.add_argument(
        "--header-read-timeout-s",
        type=float,
        default=10.0,
        help="seconds a request head may take to arrive before its connection is closed (default 10)",
    )
    srv.add_argument(
        "--keep-alive-timeout-s",
        type=float,
        default=5.0,
        help="seconds an idle keep-alive connection stays open (default 5)",
    )
    srv.add_argument(
        "--allowed-hosts",
        default=None,
        help="comma-separated Host header names accepted ('*.example.com' for subdomains, '*' any); "
        "others get 400. Default: with a loopback --host, only localhost, 127.0.0.1 and [::1] (a web "
        "page could otherwise drive a local server through DNS rebinding); any host otherwise",
    )
    srv.add_argument(
        "--body-read-timeout-s",
        type=float,
        default=30.0,
        help="seconds a request body may take to arrive; a stalled upload gets 408 and its connection "
        "closed (default 30)",
    )
    srv.add_argument(
        "--tokenizer-threads",
        type=int,
        default=4,
        help="gateway threads that tokenize prompts, each with its own tokenizer copy (default 4)",
    )
    srv.add_argument(
        "--tool-call-parser",
        default="auto",
        choices=TOOL_CALL_PARSER_OPTIONS,
        help="how tool_choice 'auto' reads tool calls in the model's output: auto (default) detects the "
        "format from the chat template (<tool_call>: hermes, [TOOL_CALLS]: mistral, <|python_tag|> or "
        "ipython: llama3_json); none refuses tool_choice 'auto' ('required' and named functions need no parser)",
    )
    srv.add_argument(
        "--protect-metrics-and-docs",
        action="store_true",
        help="/metrics, /openapi.json and /docs need the API key too (default: open, for scrapers)",
    )
    _add_engine_args(srv)
    srv.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
