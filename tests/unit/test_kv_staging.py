"""The KV staging buffer: exact region placement, references checked before any byte is read, no files at all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.workers.kv_staging import ExtentAllocator, StagingBuffer, StagingReader


def test_regions_are_first_fit_page_aligned_and_merge_when_freed():
    allocator = ExtentAllocator(10 * 4096)
    a = allocator.allocate(1)  # one byte still takes a page
    b = allocator.allocate(3 * 4096)
    c = allocator.allocate(4096 + 1)
    assert (a, b, c) == (0, 4096, 4 * 4096)
    assert allocator.allocate(5 * 4096) is None  # 4 pages left
    allocator.free(b)
    assert allocator.allocate(2 * 4096) == 4096  # first fit: the hole b left
    allocator.free(4096)
    allocator.free(a)
    allocator.free(c)  # every neighbour merged back: the whole buffer is one range again
    assert allocator.num_regions == 0 and allocator.allocate(10 * 4096) == 0


def test_a_reader_sees_what_the_buffer_holds_and_refuses_bad_references():
    buffer = StagingBuffer(64 * 1024, pin=False)
    reader = StagingReader(pin=False)
    try:
        assert oct(os.stat(buffer.path).st_mode & 0o777) == "0o600"
        offset = buffer.allocator.allocate(4096)
        buffer.view(offset, 4096).copy_(torch.arange(4096) % 251)
        assert torch.equal(reader.view(buffer.name, offset, 4096), (torch.arange(4096) % 251).to(torch.uint8))
        for name in ["../../etc/passwd", "tristage-kv-1-zz", "tristage-kv-1-0123456789abcdef", "/proc/1/fd/3"]:
            with pytest.raises(ValueError, match="not a staging buffer name"):
                reader.view(name, 0, 1)
        with pytest.raises(ValueError, match="outside"):
            reader.view(buffer.name, 60 * 1024, 8192)
        with pytest.raises(ValueError, match="not on this host"):
            reader.view("tristage-kv-1-0-0123456789abcdef", 0, 1)  # pid 1's stdin, not a buffer
        pid, fd, _token = buffer.name.removeprefix("tristage-kv-").split("-")
        with pytest.raises(ValueError, match="not on this host"):  # the right descriptor, another token
            reader.view(f"tristage-kv-{pid}-{fd}-{'0' * 16}", 0, 1)
    finally:
        reader.close()
        buffer.close()
    assert not buffer.path.exists()


def test_no_file_is_ever_made_and_a_killed_holder_leaves_nothing():
    """The buffer is a memfd: nothing in /dev/shm while it lives, nothing after SIGKILL of its process."""
    before = set(os.listdir("/dev/shm"))
    code = (
        "import sys, time\n"
        "from services.workers.kv_staging import StagingBuffer\n"
        "buffer = StagingBuffer(1 << 20, pin=False)\n"
        "buffer.view(0, 3).fill_(7)\n"
        "print(buffer.name, flush=True)\n"
        "time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    reader = StagingReader(pin=False)
    try:
        name = holder.stdout.readline().strip()
        assert reader.view(name, 0, 3).tolist() == [7, 7, 7]  # mapped through the holder's descriptor
        assert set(os.listdir("/dev/shm")) - before == set()
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        assert reader.view(name, 0, 3).tolist() == [7, 7, 7]  # a mapping keeps the memory it maps
        with pytest.raises(ValueError, match="not on this host"):
            StagingReader(pin=False).view(name, 0, 3)  # ... but the holder's descriptor is gone
        assert set(os.listdir("/dev/shm")) - before == set()
        assert not Path(f"/proc/{holder.pid}").exists()
    finally:
        reader.close()
        holder.kill()
