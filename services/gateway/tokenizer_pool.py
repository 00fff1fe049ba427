"""The gateway's tokenizer threads: tokenization never runs on the event loop, and never unbounded.

    num_threads   threads (GatewayConfig.tokenizer_threads, default 4); work beyond them waits in the
                  executor's queue, so a burst of long prompts holds at most this many cores

A fast tokenizer called from several threads at once can fail ("Already borrowed"), so each thread
tokenizes with its own deep copy of the tokenizer, made on the thread's first task (the first thread
uses the original, which nothing else in the gateway calls). A vision-language processor is not
copied: its calls take a lock, one at a time, as they did when there was a single tokenizer thread.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class TokenizerPool:
    def __init__(self, tokenizer: object, processor: object | None, num_threads: int) -> None:
        self._tokenizer = tokenizer
        self._processor = processor
        self._processor_lock = threading.Lock()
        self._original_taken = False
        self._copy_lock = threading.Lock()
        self._local = threading.local()
        self._executor = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="tokenizer")

    async def run_with_tokenizer(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(tokenizer, *args)` on a tokenizer thread, with that thread's own tokenizer."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._with_tokenizer, fn, args)

    async def run_with_processor(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(processor, *args)` on a tokenizer thread, one processor call at a time."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._with_processor, fn, args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _with_tokenizer(self, fn: Callable[..., T], args: tuple) -> T:
        return fn(self._thread_tokenizer(), *args)

    def _with_processor(self, fn: Callable[..., T], args: tuple) -> T:
        with self._processor_lock:
            return fn(self._processor, *args)

    def _thread_tokenizer(self) -> object:
        tokenizer = getattr(self._local, "tokenizer", None)
        if tokenizer is None:
            with self._copy_lock:
                tokenizer = self._tokenizer if not self._original_taken else copy.deepcopy(self._tokenizer)
                self._original_taken = True
            self._local.tokenizer = tokenizer
        return tokenizer
