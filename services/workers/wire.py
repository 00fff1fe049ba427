"""Conversions between the wire messages (services.common.messages) and the engine's objects, for
every worker role: sampling parameters, token deltas, and embedding frames.

    SamplingSpec ──sampling_params──▶ SamplingParams          (one mapping, same fields and defaults)
    RequestOutput ──to_delta──▶ RequestDelta                   (what a step added, per completion;
                                                                the prompt logprobs, in the first)
    [num_rows, hidden_size] rows ──embedding_frame──▶ bytes ──rows_from_frame──▶ rows   (row-major)

An embedding frame is one image's rows, row-major, in a dtype named as torch names it without the
prefix ("bfloat16"): an encoder's ImageEmbedding carries one, a KVTransfer one per image. Receivers
check the byte count against the header before building a tensor and never unpickle.
"""

from __future__ import annotations

import torch
import zmq

from services.common.codec import DecodeError
from services.common.messages import (
    CompletionDelta,
    ImageEmbedding,
    PositionLogprobs,
    PromptPositionLogprobs,
    RankedLogprob,
    RequestDelta,
    SamplingSpec,
    TokenLogprob,
)
from services.engine import SamplingParams
from services.engine.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput

# Qwen2-VL 72B's largest image: 16384 rows x 8192 x 2 bytes = 256 MiB
MAX_EMBEDDING_MESSAGE_BYTES = 2**30
EMBEDDING_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def sampling_params(spec: SamplingSpec) -> SamplingParams:
    return SamplingParams(**{f: getattr(spec, f) for f in spec.__struct_fields__})


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype's canonical name ("bfloat16"), as embedding frames name it (a config may say "bf16")."""
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------------
# Token deltas


def to_delta(output: RequestOutput, num_top_logprobs: int = 0) -> RequestDelta:
    completions = [_completion_delta(c, num_top_logprobs) for c in output.outputs if c.delta_token_ids or c.finished]
    return RequestDelta(
        request_id=output.request_id,
        completions=completions,
        finished=output.finished,
        num_prompt_tokens=len(output.prompt_token_ids),
        num_cached_tokens=output.num_cached_tokens,
        prompt_logprobs=_prompt_positions(output.prompt_logprobs) if output.prompt_logprobs is not None else None,
    )


def _completion_delta(c: CompletionOutput, num_top: int) -> CompletionDelta:
    logprobs = None
    if c.delta_logprobs is not None:
        logprobs = [_position(token_id, entry, num_top) for token_id, entry in zip(c.delta_token_ids, c.delta_logprobs)]
    return CompletionDelta(
        index=c.index,
        token_ids=c.delta_token_ids,
        text=c.delta_text,
        start_index=len(c.token_ids) - len(c.delta_token_ids),
        logprobs=logprobs,
        finish_reason=c.finish_reason,
        stop_reason=c.stop_reason,
    )


def _position(token_id: int, entry: dict[int, Logprob], num_top: int) -> PositionLogprobs:
    def item(tid: int) -> TokenLogprob:
        return TokenLogprob(tid, entry[tid].decoded_token or "", entry[tid].logprob)

    # the entry holds the top-k plus the sampled token; a sampled token outside the top-k ranks last
    top = sorted(entry, key=lambda tid: entry[tid].rank)[:num_top]
    return PositionLogprobs(sampled=item(token_id), top=[item(tid) for tid in top])


def _prompt_positions(prompt_logprobs: PromptLogprobs) -> list[PromptPositionLogprobs]:
    """Each position's entry as it is ordered: the prompt token first, then the top-k by rank."""
    return [
        None
        if entry is None
        else [RankedLogprob(tid, lp.decoded_token or "", lp.logprob, lp.rank) for tid, lp in entry.items()]
        for entry in prompt_logprobs
    ]


# ----------------------------------------------------------------------------------------------
# Embedding frames


def embedding_frame(rows: torch.Tensor) -> tuple[str, memoryview]:
    """(dtype name, the rows' bytes on the CPU, row-major) of [num_rows, hidden_size] rows."""
    dtype = dtype_name(rows.dtype)
    if dtype not in EMBEDDING_DTYPES:
        raise ValueError(f"embeddings of dtype {dtype} cannot be sent")
    host = rows.detach().to("cpu").contiguous()
    return dtype, host.view(-1).view(torch.uint8).numpy().data  # the array's buffer: keeps `host` alive


def embedding_from_frame(header: ImageEmbedding, frame: bytes | memoryview | zmq.Frame) -> torch.Tensor:
    """The [num_rows, hidden_size] CPU tensor an ImageEmbedding's frame holds; raises DecodeError."""
    return rows_from_frame(frame, header.num_rows, header.hidden_size, header.dtype)


def rows_from_frame(
    frame: bytes | memoryview | zmq.Frame, num_rows: int, hidden_size: int, dtype_name: str
) -> torch.Tensor:
    """A [num_rows, hidden_size] CPU tensor of `dtype_name` from a frame of exactly that many bytes
    (an ImageEmbedding's, or one of a KVTransfer's image frames); raises DecodeError."""
    buffer = frame.buffer if isinstance(frame, zmq.Frame) else memoryview(frame)
    dtype = EMBEDDING_DTYPES.get(dtype_name)
    if dtype is None:
        raise DecodeError(f"embedding dtype {dtype_name!r} is not one of {', '.join(EMBEDDING_DTYPES)}")
    if num_rows < 1 or hidden_size < 1:
        raise DecodeError(f"an embedding of {num_rows} x {hidden_size} rows")
    num_bytes = num_rows * hidden_size * dtype.itemsize
    if buffer.nbytes != num_bytes:
        raise DecodeError(
            f"the embedding frame holds {buffer.nbytes} bytes; "
            f"{num_rows} x {hidden_size} {dtype_name} rows take {num_bytes} bytes"
        )
    flat = torch.frombuffer(bytearray(buffer), dtype=torch.uint8)  # a copy: the tensor owns its memory
    return flat.view(dtype).view(num_rows, hidden_size)
