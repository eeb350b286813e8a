"""The native core releases the GIL while it waits on I/O, so Python threads keep running."""

from __future__ import annotations

import array

import torch

from ckptio import _core

from conftest import assert_releases_gil


def test_parallel_read_releases_the_gil(tmp_path):
    nbytes = 256 << 20
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * (nbytes // 256))
    dst = torch.empty(nbytes, dtype=torch.uint8)
    requests = array.array("Q", [0, nbytes, dst.data_ptr()])
    with _core.io.File.open(str(path), _core.io.FileMode.READ) as f:
        assert_releases_gil(lambda: f.read_into(requests, 1, 1 << 20))
    assert torch.equal(dst[:512], torch.arange(256, dtype=torch.uint8).repeat(2))
