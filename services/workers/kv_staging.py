"""Host staging for KV transfers: one shared-memory buffer per prefill worker, read in place on the host.

A prefill worker copies a request's KV from its GPU cache into a region of its staging buffer (on
a side CUDA stream, so the next prefill step is not held up), then frees the GPU blocks at once.
Where the decode worker shares the host, only a reference (file, offset, length) crosses the
socket and the decode worker copies the bytes from the same memory straight to its GPU: the
same-host fast path, with ZeroMQ carrying control only. Across hosts the region's bytes go out as
raw ZeroMQ frames. Either way the region stays taken until the decode worker's ack (or the lease).

    memfd "tristage-kv-<random>"   capacity_bytes, pinned for DMA when a GPU is there
    | region r1 (request a) | free | region r2 (request b) |      free      |
      ^ offset, nbytes: first fit, aligned to ALIGN_BYTES; freed on ack, neighbours merged

Invariants: a region is written only by its prefill worker and only before its reference is sent;
a decode worker reads a region only between that reference and its ack.

No file, so nothing to leave behind: the buffer is an anonymous shared-memory file (memfd_create),
never linked in /dev/shm. Its memory lives exactly as long as some process holds it (the prefill
worker's descriptor, a decode worker's mapping), so even SIGKILL of every process frees it. A
decode worker maps it through the prefill worker's descriptor, `/proc/<pid>/fd/<fd>` (the kernel
allows that to processes of the same user, as it allowed the 0600 file before), and checks that
the descriptor it opened is this buffer by its random name before mapping a byte. An unlinked
/dev/shm file could not be shared like this after the fact: decode workers map lazily (at their
first transfer from a prefill worker, again after a restart, and any decode worker added later),
so "unlink once both ends have mapped it" never has a moment when every reader is known.

    reference name  tristage-kv-<pid>-<fd>-<16 hex>     (on the wire: StagingRef.name)
    opened as       /proc/<pid>/fd/<fd>, which must link to "/memfd:tristage-kv-<16 hex> (deleted)"

Tunables (defaults):
    ALIGN_BYTES = 4096              region alignment (pages)
    capacity_bytes (worker option)  4 GiB on a GPU (64 MiB on a CPU engine); 0 disables staging (KV then
                                    goes through plain host copies). A transfer that finds it full waits
                                    for room (services.workers.kv_sender)
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
_MEMFD_PREFIX = "tristage-kv-"
_NAME_PATTERN = re.compile(r"^tristage-kv-(\d{1,10})-(\d{1,10})-([0-9a-f]{16})$")  # pid, fd, token


class ExtentAllocator:
    """First-fit allocation of byte ranges inside [0, capacity_bytes), freed in any order."""

    def __init__(self, capacity_bytes: int, align_bytes: int = ALIGN_BYTES) -> None:
        self.capacity_bytes = capacity_bytes
        self.align_bytes = align_bytes
        self._free: list[tuple[int, int]] = [(0, capacity_bytes)] if capacity_bytes > 0 else []  # (offset, size)
        self._taken: dict[int, int] = {}  # offset -> size

    def fits(self, nbytes: int) -> bool:
        """Whether a region of `nbytes` fits the empty buffer (it may not fit the free room now)."""
        return self._size(nbytes) <= self.capacity_bytes

    def allocate(self, nbytes: int) -> int | None:
        """Offset of a region of at least `nbytes`, or None when no free range is big enough."""
        size = self._size(nbytes)
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

    def _size(self, nbytes: int) -> int:
        return -(-max(nbytes, 1) // self.align_bytes) * self.align_bytes

    @property
    def num_taken_bytes(self) -> int:
        return sum(self._taken.values())

    @property
    def num_regions(self) -> int:
        return len(self._taken)


class StagingBuffer:
    """The prefill side: an anonymous shared-memory file this process writes KV into."""

    def __init__(self, capacity_bytes: int, pin: bool) -> None:
        token = secrets.token_hex(8)
        self.capacity_bytes = capacity_bytes
        self._fd = os.memfd_create(_MEMFD_PREFIX + token, os.MFD_CLOEXEC)
        try:
            os.fchmod(self._fd, 0o600)
            # reserve the pages now: past the memory limit this fails cleanly, where a sparse file would
            # fault (SIGBUS) on first touch
            os.posix_fallocate(self._fd, 0, capacity_bytes)
        except OSError:
            os.close(self._fd)
            raise
        self.name = f"{_MEMFD_PREFIX}{os.getpid()}-{self._fd}-{token}"  # what a StagingRef carries
        self.path = Path(f"/proc/{os.getpid()}/fd/{self._fd}")  # how another process of this host opens it
        self.tensor = torch.from_file(f"/proc/self/fd/{self._fd}", shared=True, size=capacity_bytes, dtype=torch.uint8)
        self._unpin = pin_host_memory(self.tensor) if pin else None
        self.allocator = ExtentAllocator(capacity_bytes)

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        return self.tensor[offset : offset + nbytes]

    def close(self) -> None:
        """Give up this process's hold: the memory goes once no decode worker maps it either."""
        if self._unpin is not None:
            self._unpin()
            self._unpin = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class StagingReader:
    """The decode side: maps prefill workers' staging buffers by reference name, read-only in effect."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self._maps: dict[str, tuple[torch.Tensor, Callable[[], None] | None]] = {}

    def view(self, name: str, offset: int, nbytes: int) -> torch.Tensor:
        """The bytes [offset, offset + nbytes) of staging buffer `name`. ValueError if the reference is bad."""
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
        # a prefill worker that restarted has a new buffer: drop the maps of buffers whose holder is gone
        for old in [n for n in self._maps if not _holder_alive(n)]:
            _, unpin = self._maps.pop(old)
            if unpin is not None:
                unpin()
        fd = _open_buffer(name)
        try:
            size = os.fstat(fd).st_size
            tensor = torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=size, dtype=torch.uint8)
        finally:
            os.close(fd)  # the mapping keeps the memory
        self._maps[name] = (tensor, pin_host_memory(tensor) if self.pin else None)


def _open_buffer(name: str) -> int:
    """A descriptor of the buffer `name` names, checked to be that buffer (not a reused pid or fd)."""
    match = _NAME_PATTERN.match(name)
    assert match is not None
    pid, fd, token = match.groups()
    try:
        opened = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    except OSError:  # no such process or descriptor here (another host, or gone), or not ours to open
        raise ValueError(f"staging buffer {name} is not on this host") from None
    if os.readlink(f"/proc/self/fd/{opened}") != f"/memfd:{_MEMFD_PREFIX}{token} (deleted)":
        os.close(opened)
        raise ValueError(f"staging buffer {name} is not on this host")
    return opened


def _holder_alive(name: str) -> bool:
    """The prefill worker that made buffer `name` still holds it."""
    match = _NAME_PATTERN.match(name)
    assert match is not None
    pid, fd, token = match.groups()
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}") == f"/memfd:{_MEMFD_PREFIX}{token} (deleted)"
    except OSError:
        return False


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
