"""The `tristage-loadgen` command (also `python -m loadgen`).

    tristage-loadgen run     --base-url URL [workload] [arrivals] [limits] --out DIR
    tristage-loadgen compare --target NAME=URL --target NAME=URL ...      (same requests to each)
    tristage-loadgen sweep   --rates 1,2,4,8 (--base-url URL | --target NAME=URL ...)
    tristage-loadgen report  DIR [DIR ...] --out DIR       (table and plots of finished runs)

Every run stops by itself: after --num-requests requests or --time-limit seconds, whichever comes
first, and it sends traffic only to the base URLs it is given. All flags are parsed here, once,
into the frozen configs the other modules take.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from rich.console import Console

from loadgen.arrivals import ArrivalConfig
from loadgen.bench import RunPlan, build_requests, discover_model, run_benchmark
from loadgen.client import RequestOptions, Target
from loadgen.images import ImageConfig, parse_sizes
from loadgen.lengths import parse_length
from loadgen.metrics import parse_slo
from loadgen.records import RequestResult
from loadgen.report import load_run, print_compare, print_summary, print_sweep, write_json
from loadgen.workloads import (
    DEFAULT_LONG_FRACTION,
    DEFAULT_TRACE_BLOCK_SIZE,
    DEFAULT_ZIPF_EXPONENT,
    LongContextWorkload,
    MultimodalWorkload,
    MultiTurnWorkload,
    RandomWorkload,
    SharedPrefixWorkload,
    TraceWorkload,
    Workload,
)

WORKLOADS = ("random", "shared-prefix", "multi-turn", "long-context", "multimodal", "trace")
DEFAULT_NUM_REQUESTS = 100
PIPED_WIDTH = 160
LATENCY_CDF_PNG, COMPARE_PNG, SWEEP_PNG = "latency_cdf.png", "compare.png", "sweep.png"


def _add_target_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("target")
    group.add_argument("--base-url", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    group.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="a named base URL (repeat for compare and sweep)",
    )
    group.add_argument("--model", help="model name to send (default: the first of GET /v1/models)")
    group.add_argument("--api-key", help="sent as a Bearer token")
    group.add_argument("--endpoint", choices=("chat", "completions"), default="chat")


def _add_workload_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "workload (lengths: N, uniform:min=A,max=B or lognormal:median=M,sigma=S[,max=X])"
    )
    group.add_argument("--workload", choices=WORKLOADS, default="random")
    group.add_argument("--input-len", default="256", help="prompt tokens (multi-turn: per turn; long-context: short)")
    group.add_argument("--output-len", default="64", help="output tokens, sent as max_tokens = min_tokens")
    group.add_argument("--num-groups", type=int, default=8, help="shared-prefix: number of prefixes")
    group.add_argument("--zipf", type=float, default=DEFAULT_ZIPF_EXPONENT, help="shared-prefix: popularity exponent")
    group.add_argument("--prefix-len", default="512", help="shared-prefix: prefix tokens")
    group.add_argument("--suffix-len", default="64", help="shared-prefix: tokens after the prefix")
    group.add_argument("--turns", type=int, default=4, help="multi-turn: turns per conversation")
    group.add_argument("--long-input-len", default="8192", help="long-context: tokens of a long prompt")
    group.add_argument(
        "--long-fraction", type=float, default=DEFAULT_LONG_FRACTION, help="long-context: share of long prompts"
    )
    group.add_argument("--images-per-request", type=int, default=1, help="multimodal")
    group.add_argument("--image-size", default="512x512", help="multimodal: WxH[,WxH...], picked uniformly")
    group.add_argument("--image-repeat", type=float, default=0.0, help="multimodal: share of repeated images")
    group.add_argument("--image-format", choices=("jpeg", "png"), default="jpeg")
    group.add_argument("--image-dir", help="multimodal: read images from this folder instead")
    group.add_argument("--trace", help="trace: CSV or JSONL file")
    group.add_argument("--trace-time-unit", choices=("s", "ms"), default="s")
    group.add_argument("--trace-speedup", type=float, default=1.0, help="trace: divide the timestamps by this")
    group.add_argument(
        "--trace-block-size", type=int, default=DEFAULT_TRACE_BLOCK_SIZE, help="trace: tokens per hash id"
    )
    group.add_argument("--tokenizer", help="local HF tokenizer directory (default: one word = one token)")
    group.add_argument(
        "--prompt-token-ids", action="store_true", help="completions: send prompts as token ids (needs --tokenizer)"
    )
    group.add_argument("--seed", type=int, default=0)


def _add_run_args(parser: argparse.ArgumentParser, with_rate: bool = True) -> None:
    group = parser.add_argument_group("arrivals and limits")
    if with_rate:
        group.add_argument(
            "--rate",
            type=float,
            help="req/s, Poisson (gamma with --burstiness); inf: all at once (default, or the trace's times)",
        )
    group.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: < 1 burstier, 1 Poisson")
    group.add_argument("--concurrency", type=int, help="requests in flight: a closed loop, or a cap with --rate")
    group.add_argument("--num-requests", type=int, help=f"default {DEFAULT_NUM_REQUESTS} (trace: every row)")
    group.add_argument("--time-limit", type=float, default=600.0, help="seconds; the run stops then")
    group.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    group.add_argument("--slo", help="e.g. ttft=2s,tpot=50ms,e2e=20s: goodput counts requests within all")
    group.add_argument(
        "--no-fixed-output",
        action="store_true",
        help="do not send ignore_eos and min_tokens (for servers without vLLM's extras)",
    )
    group.add_argument("--extra-body", type=json.loads, default={}, help="JSON merged into every request")
    group.add_argument("--out", type=Path, help="output folder (default: results/<command>-<time>)")
    group.add_argument("--no-progress", action="store_true")
    group.add_argument("--no-plots", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tristage-loadgen", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "one workload against one endpoint"),
        ("compare", "the same workload against several endpoints, side by side"),
        ("sweep", "the same workload at several request rates"),
    ):
        command = sub.add_parser(name, help=help_text)
        _add_target_args(command)
        _add_workload_args(command)
        _add_run_args(command, with_rate=name != "sweep")
        if name == "sweep":
            command.add_argument("--rates", required=True, help="comma-separated req/s, e.g. 1,2,4,8")
    report = sub.add_parser("report", help="table and plots of finished runs, side by side")
    report.add_argument("runs", nargs="+", type=Path, help="run folders (each with summary.json)")
    report.add_argument("--out", type=Path, required=True)
    report.add_argument("--no-plots", action="store_true")
    return parser


# ----------------------------------------------------------------------------------------------
# Flags -> configs


def workload_from_args(args: argparse.Namespace) -> Workload:
    inputs, outputs = parse_length(args.input_len), parse_length(args.output_len)
    if args.workload == "random":
        return RandomWorkload(inputs, outputs)
    if args.workload == "shared-prefix":
        return SharedPrefixWorkload(
            args.num_groups, parse_length(args.prefix_len), parse_length(args.suffix_len), outputs, args.zipf
        )
    if args.workload == "multi-turn":
        return MultiTurnWorkload(args.turns, inputs, outputs)
    if args.workload == "long-context":
        return LongContextWorkload(inputs, parse_length(args.long_input_len), outputs, args.long_fraction)
    if args.workload == "multimodal":
        images = ImageConfig(
            args.images_per_request, parse_sizes(args.image_size), args.image_repeat, args.image_format, args.image_dir
        )
        return MultimodalWorkload(inputs, outputs, images)
    if not args.trace:
        raise SystemExit("--workload trace needs --trace FILE")
    return TraceWorkload(args.trace, args.trace_time_unit, args.trace_speedup, args.trace_block_size)


def targets_from_args(args: argparse.Namespace) -> list[Target]:
    named = [(urlparse(args.base_url).netloc or args.base_url, args.base_url)] if args.base_url else []
    for item in args.target:
        name, sep, url = item.partition("=")
        if not sep or not name or not url:
            raise SystemExit(f"--target takes NAME=URL, got {item!r}")
        named.append((name, url))
    if not named:
        raise SystemExit("give --base-url or --target NAME=URL")
    if len({name for name, _ in named}) < len(named):
        raise SystemExit("target names must differ")
    return [
        Target(name, url, args.model or discover_model(url, args.api_key), args.endpoint, args.api_key)
        for name, url in named
    ]


def plan_from_args(args: argparse.Namespace, rate: float | None) -> RunPlan:
    return RunPlan(
        arrivals=ArrivalConfig(rate, args.burstiness, args.concurrency, args.seed),
        time_limit_s=args.time_limit,
        request_timeout_s=args.request_timeout,
        slo=parse_slo(args.slo),
        options=RequestOptions(
            fixed_output_len=not args.no_fixed_output,
            prompt_token_ids=args.prompt_token_ids,
            extra_body=args.extra_body,
        ),
        show_progress=not args.no_progress,
    )


def _check_args(args: argparse.Namespace) -> None:
    if args.workload == "multimodal" and args.endpoint != "chat":
        raise SystemExit("--workload multimodal needs --endpoint chat")
    if args.prompt_token_ids and (args.endpoint != "completions" or not args.tokenizer):
        raise SystemExit("--prompt-token-ids needs --endpoint completions and --tokenizer")
    if args.time_limit <= 0:
        raise SystemExit("--time-limit must be > 0")


def _requests(args: argparse.Namespace, workload: Workload) -> Any:
    num_requests = args.num_requests
    if num_requests is None and args.workload != "trace":
        num_requests = DEFAULT_NUM_REQUESTS
    return build_requests(workload, num_requests, args.tokenizer, args.seed)


def _out_dir(args: argparse.Namespace) -> Path:
    return args.out or Path("results") / f"{args.command}-{time.strftime('%Y%m%d-%H%M%S')}"


# ----------------------------------------------------------------------------------------------
# Commands


def _run(args: argparse.Namespace, console: Console) -> int:
    targets = targets_from_args(args)
    if len(targets) != 1:
        raise SystemExit("run takes one target; use compare for several")
    workload, out = workload_from_args(args), _out_dir(args)
    summary, results = run_benchmark(
        targets[0], plan_from_args(args, args.rate), workload, _requests(args, workload), out
    )
    print_summary(summary, console)
    if not args.no_plots:
        from loadgen.plots import plot_latency_cdfs  # matplotlib loads only when plotting

        plot_latency_cdfs({targets[0].name: results}, out / LATENCY_CDF_PNG)
    console.print(f"results in {out}")
    return 0


def _compare_outputs(
    runs: dict[str, tuple[dict[str, Any], list[RequestResult]]], out: Path, console: Console, no_plots: bool
) -> None:
    summaries = {name: summary for name, (summary, _) in runs.items()}
    write_json(out / "compare.json", summaries)
    print_compare(summaries, console)
    if not no_plots:
        from loadgen.plots import plot_compare, plot_latency_cdfs

        plot_latency_cdfs({name: results for name, (_, results) in runs.items()}, out / LATENCY_CDF_PNG)
        plot_compare(summaries, out / COMPARE_PNG)
    console.print(f"results in {out}")


def _compare(args: argparse.Namespace, console: Console) -> int:
    targets, workload, out = targets_from_args(args), workload_from_args(args), _out_dir(args)
    specs, plan = _requests(args, workload), plan_from_args(args, args.rate)
    runs = {target.name: run_benchmark(target, plan, workload, specs, out / target.name) for target in targets}
    _compare_outputs(runs, out, console, args.no_plots)
    return 0


def _sweep(args: argparse.Namespace, console: Console) -> int:
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    if not rates or any(not 0 < r < float("inf") for r in rates):
        raise SystemExit("--rates takes finite positive numbers, e.g. 1,2,4,8")
    targets, workload, out = targets_from_args(args), workload_from_args(args), _out_dir(args)
    specs = _requests(args, workload)
    points, runs = [], {}
    for target in targets:
        for rate in rates:
            run_dir = out / (target.name if len(targets) > 1 else "") / f"rate-{rate:g}"
            summary, results = run_benchmark(target, plan_from_args(args, rate), workload, specs, run_dir)
            points.append(summary)
            runs[f"{target.name} @ {rate:g}/s" if len(targets) > 1 else f"{rate:g} req/s"] = results
    write_json(out / "sweep.json", points)
    print_sweep(points, console)
    if not args.no_plots:
        from loadgen.plots import plot_latency_cdfs, plot_sweep

        plot_sweep(points, out / SWEEP_PNG)
        plot_latency_cdfs(runs, out / LATENCY_CDF_PNG)
    console.print(f"results in {out}")
    return 0


def _report(args: argparse.Namespace, console: Console) -> int:
    runs = {}
    for run_dir in args.runs:
        summary, results = load_run(run_dir)
        runs[run_dir.name if run_dir.name not in runs else str(run_dir)] = (summary, results)
    _compare_outputs(runs, args.out, console, args.no_plots)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=PIPED_WIDTH)  # no wrapping in logs
    if args.command != "report":
        _check_args(args)
    command = {"run": _run, "compare": _compare, "sweep": _sweep, "report": _report}[args.command]
    return command(args, console)


if __name__ == "__main__":
    sys.exit(main())
