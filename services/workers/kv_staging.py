"""Host staging for KV transfers: one shared-memory buffer per prefill worker, read in place on the host.

A prefill worker copies a request's KV from its GPU cache into a region of its staging buffer (on
a side CUDA stream, so the next prefill step is not held up), then frees the GPU blocks at once.
Where the decode worker shares the host, only a reference (file, offset, length) crosses the
socket and the decode worker copies the bytes from the same memory straight to its GPU: the
same-host fast path, with ZeroMQ carrying control only. Across hosts the region's bytes go out as
raw ZeroMQ frames. Either way the region stays taken until the decode worker's ack (or the lease).

    /dev/shm/tristage-kv-<pid>-<random>   capacity_bytes, pinned for DMA when a GPU is there
    | region r1 (request a) | free | region r2 (request b) |      free      |
      ^ offset, nbytes: first fit, aligned to ALIGN_BYTES; freed on ack, neighbours merged

Invariants: a region is written only by its prefill worker and only before its reference is sent;
a decode worker reads a region only between that reference and its ack. The file is created
0600 (same user only) and removed on close; files of dead processes are removed at start.

Tunables (defaults):
    ALIGN_BYTES = 4096              region alignment (pages)
    capacity_bytes (worker option)  1 GiB; 0 disables staging (KV then goes through plain host copies)
"""

from __future__ import annotations

import bisect
import logging
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ALIGN_BYTES = 4096
SHM_DIR = Path("/dev/shm")
_NAME_PATTERN = re.compile(r"^tristage-kv-(\d+)-[0-9a-f]{16}$")


class ExtentAllocator:
    """First-fit allocation of byte ranges inside [0, capacity_bytes), freed in any order."""

    def __init__(self, capacity_bytes: int, align_bytes: int = ALIGN_BYTES) -> None:
        self.capacity_bytes = capacity_bytes
        self.align_bytes = align_bytes
        self._free: list[tuple[int, int]] = [(0, capacity_bytes)] if capacity_bytes > 0 else []  # (offset, size)
        self._taken: dict[int, int] = {}  # offset -> size

    def allocate(self, nbytes: int) -> int | None:
        """Offset of a region of at least `nbytes`, or None when no free range is big enough."""
        size = -(-max(nbytes, 1) // self.align_bytes) * self.align_bytes
        for i, (offset, free_size) in enumerate(self._free):
            if free_size >= size:
                if free_size == size:
                    del self._free[i]
                else:
                    self._free[i] = (offset + size, free_size - size)
                self._taken[offset] = size
                return offset
        return None

    def free(self, offset: int) -> None:
        size = self._taken.pop(offset)
        i = bisect.bisect(self._free, (offset, 0))
        self._free.insert(i, (offset, size))
        # merge with the right neighbour, then the left one
        if i + 1 < len(self._free) and offset + size == self._free[i + 1][0]:
            self._free[i] = (offset, size + self._free.pop(i + 1)[1])
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            left_offset, left_size = self._free[i - 1]
            self._free[i - 1] = (left_offset, left_size + self._free.pop(i)[1])

    @property
    def num_taken_bytes(self) -> int:
        return sum(self._taken.values())

    @property
    def num_regions(self) -> int:
        return len(self._taken)


class StagingBuffer:
    """The prefill side: a shared-memory file this process writes KV into."""

    def __init__(self, capacity_bytes: int, pin: bool) -> None:
        remove_stale_files()
        self.name = f"tristage-kv-{os.getpid()}-{secrets.token_hex(8)}"
        self.path = SHM_DIR / self.name
        self.capacity_bytes = capacity_bytes
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # reserve the pages now: on a too-small tmpfs this fails cleanly, where a sparse file would
            # fault (SIGBUS) on first touch
            os.posix_fallocate(fd, 0, capacity_bytes)
        except OSError:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        os.close(fd)
        self.tensor = torch.from_file(str(self.path), shared=True, size=capacity_bytes, dtype=torch.uint8)
        self._unpin = pin_host_memory(self.tensor) if pin else None
        self.allocator = ExtentAllocator(capacity_bytes)

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        return self.tensor[offset : offset + nbytes]

    def close(self) -> None:
        if self._unpin is not None:
            self._unpin()
            self._unpin = None
        self.path.unlink(missing_ok=True)


class StagingReader:
    """The decode side: maps prefill workers' staging files by name, read-only in effect."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self._maps: dict[str, tuple[torch.Tensor, Callable[[], None] | None]] = {}

    def view(self, name: str, offset: int, nbytes: int) -> torch.Tensor:
        """The bytes [offset, offset + nbytes) of staging file `name`. ValueError if the reference is bad."""
        if not _NAME_PATTERN.match(name):  # names come off a socket: never a path
            raise ValueError(f"not a staging buffer name: {name!r}")
        if name not in self._maps:
            self._map(name)
        tensor = self._maps[name][0]
        if offset < 0 or nbytes < 0 or offset + nbytes > tensor.numel():
            raise ValueError(
                f"staging reference [{offset}, {offset + nbytes}) is outside {name} ({tensor.numel()} bytes)"
            )
        return tensor[offset : offset + nbytes]

    def close(self) -> None:
        for _, unpin in self._maps.values():
            if unpin is not None:
                unpin()
        self._maps.clear()

    def _map(self, name: str) -> None:
        # a prefill worker that restarted left its old file behind: drop maps whose file is gone
        for old in [n for n in self._maps if not (SHM_DIR / n).exists()]:
            _, unpin = self._maps.pop(old)
            if unpin is not None:
                unpin()
        path = SHM_DIR / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ValueError(f"staging buffer {name} is not on this host") from None
        tensor = torch.from_file(str(path), shared=True, size=size, dtype=torch.uint8)
        self._maps[name] = (tensor, pin_host_memory(tensor) if self.pin else None)


def pin_host_memory(tensor: torch.Tensor) -> Callable[[], None] | None:
    """Page-lock an existing host mapping for fast, asynchronous copies; returns how to undo it.

    None when pinning fails (no GPU, or locked-memory limits): copies still work, just slower.
    """
    if not torch.cuda.is_available():
        return None
    cudart = torch.cuda.cudart()
    pointer, nbytes = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    status = cudart.cudaHostRegister(pointer, nbytes, 0)
    if int(status) != 0:
        logger.warning(
            "could not pin %d bytes of KV staging memory (CUDA error %s); copies will be slower", nbytes, int(status)
        )
        return None
    return lambda: cudart.cudaHostUnregister(pointer)


def remove_stale_files() -> None:
    """Remove staging files left by processes that no longer run (a worker killed before its close)."""
    try:
        entries = list(SHM_DIR.iterdir())
    except OSError:
        return
    for path in entries:
        match = _NAME_PATTERN.match(path.name)
        if match and not _pid_alive(int(match.group(1))):
            path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def host_identity() -> str:
    """Equal for two processes exactly when they share this host's /dev/shm (same hostname and boot).

    Containers normally get their own hostname, and their own /dev/shm with it, so they differ.
    """
    import socket

    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = ""
    return f"{socket.gethostname()}/{boot_id}"
