"""The KV staging buffer: exact region placement, references checked before any byte is read, no files left."""

from __future__ import annotations

import os

import pytest
import torch

from services.workers.kv_staging import SHM_DIR, ExtentAllocator, StagingBuffer, StagingReader, remove_stale_files


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
        for name in ["../../etc/passwd", "tristage-kv-1-zz", "/dev/shm/" + buffer.name]:
            with pytest.raises(ValueError, match="not a staging buffer name"):
                reader.view(name, 0, 1)
        with pytest.raises(ValueError, match="outside"):
            reader.view(buffer.name, 60 * 1024, 8192)
        with pytest.raises(ValueError, match="not on this host"):
            reader.view("tristage-kv-1-0123456789abcdef", 0, 1)
    finally:
        reader.close()
        buffer.close()
    assert not buffer.path.exists()


def test_files_of_dead_processes_are_removed():
    stale = SHM_DIR / "tristage-kv-999999999-0123456789abcdef"  # no such pid
    stale.write_bytes(b"x")
    live = StagingBuffer(4096, pin=False)
    try:
        remove_stale_files()
        assert not stale.exists() and live.path.exists()
    finally:
        stale.unlink(missing_ok=True)
        live.close()
