"""The native core releases the GIL while it waits on I/O, so Python threads keep running."""

from __future__ import annotations

import array
import sys
import threading
import time

import pytest
import torch

from ckptio import _core


@pytest.fixture
def fine_switch_interval():
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    yield
    sys.setswitchinterval(old)


def test_parallel_read_releases_the_gil(tmp_path, fine_switch_interval):
    nbytes = 64 << 20
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * (nbytes // 256))
    dst = torch.empty(nbytes, dtype=torch.uint8)
    requests = array.array("Q", [0, nbytes, dst.data_ptr()])

    stamps: list[float] = []
    stop = threading.Event()

    def ticker() -> None:  # needs the GIL for every iteration
        while not stop.is_set():
            stamps.append(time.perf_counter())

    t = threading.Thread(target=ticker)
    t.start()
    try:
        with _core.File.open(str(path), _core.FileMode.READ) as f:
            time.sleep(0.01)
            spans = []
            for _ in range(5):  # repeat until the call is long enough to judge
                t0 = time.perf_counter()
                f.read_into(requests, 1, 1 << 20)
                t1 = time.perf_counter()
                spans.append((t0, t1))
                if t1 - t0 > 0.02:
                    break
    finally:
        stop.set()
        t.join()
    t0, t1 = max(spans, key=lambda s: s[1] - s[0])
    inside = [s for s in stamps if t0 < s < t1]
    assert inside, "no Python code ran while the native read was in progress"
    # With the GIL held the ticker could only run for about one switch interval at the edges.
    covered = max(inside) - min(inside)
    assert covered > 0.5 * (t1 - t0), (covered, t1 - t0)
    assert torch.equal(dst[:512], torch.arange(256, dtype=torch.uint8).repeat(2))
