"""Child process of tests/test_crash.py: kills savers at random moments and checks the target.

Run as ``python _crash_worker.py '<json config>'``; prints one JSON report on stdout. It forks
one saver per iteration (a child that writes generation i over generation i-1 and is
SIGKILLed after a random delay), then loads the target with ckptio and with torch and says
which generation it holds. torch runs single-threaded here (no OpenMP pool to inherit
across fork) and ckptio's C++ pool replaces itself in a forked child, so forking after
loads is safe.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from typing import Any

import torch

import ckptio

NAME = "ckpt.pt"


def state(generation: int, numel: int) -> dict[str, Any]:
    return {
        "generation": generation,
        "weights": [torch.full((numel,), float(generation)) for _ in range(4)],
        "bias": torch.arange(1000, dtype=torch.int64) + generation,
        "meta": {"step": generation * 10, "name": f"gen{generation}"},
    }


def check(path: str, generation: int, numel: int) -> int:
    """0: holds generation-1, 1: holds generation, 2: neither (or not loadable)."""
    try:
        ours = ckptio.load(path)
        theirs = torch.load(path)
    except Exception as e:  # reported by the exit code; the message helps debugging
        sys.stderr.write(f"iteration {generation}: load failed: {type(e).__name__}: {e}\n")
        return 2
    for outcome, g in ((0, generation - 1), (1, generation)):
        expected = state(g, numel)
        if all(_equal(x, expected) for x in (ours, theirs)):
            return outcome
    sys.stderr.write(f"iteration {generation}: the file holds neither generation\n")
    return 2


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_equal, a, b))
    return type(a) is type(b) and a == b


def fork_and_save(path: str, generation: int, numel: int, durable: bool) -> tuple[int, int]:
    """Forks a saver; returns (pid, read end of a pipe it writes b'g' to when it starts the
    save and b'd' to when the save returned)."""
    obj = state(generation, numel)  # built before the fork: the child only saves
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            os.write(w, b"g")
            with ckptio.options(durable=durable):
                ckptio.save(obj, path)
            try:
                os.write(w, b"d")
            except BrokenPipeError:
                pass  # nobody waits for it
        except BaseException:
            code = 3
        os._exit(code)
    os.close(w)
    return pid, r


def main() -> None:
    torch.set_num_threads(1)
    cfg = json.loads(sys.argv[1])
    directory, numel = cfg["directory"], cfg["numel"]
    path = os.path.join(directory, NAME)
    rng = random.Random(cfg["seed"])

    # Generation 0, complete; its duration sets the range of kill delays.
    durations = []
    for _ in range(3):
        pid, r = fork_and_save(path, 0, numel, False)
        os.read(r, 1)
        start = time.perf_counter()
        os.read(r, 1)
        os.close(r)
        _, status = os.waitpid(pid, 0)
        durations.append(time.perf_counter() - start)
        assert os.waitstatus_to_exitcode(status) == 0, "the calibration save failed"
    window = 1.2 * sorted(durations)[1]

    iterations = []
    deadline = time.monotonic() + cfg["seconds"]
    generation = 0
    while len(iterations) < cfg["max_iterations"] and time.monotonic() < deadline:
        generation += 1
        durable = generation % 4 == 0
        pid, r = fork_and_save(path, generation, numel, durable)
        os.read(r, 1)
        os.close(r)
        time.sleep(rng.uniform(0, window * (2.0 if durable else 1.0)))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        temps = sorted(n for n in os.listdir(directory) if n != NAME)
        outcome = check(path, generation, numel)
        iterations.append(
            {
                "generation": generation,
                "pid": pid,
                "durable": durable,
                "killed": os.WIFSIGNALED(status),
                "exit": os.waitstatus_to_exitcode(status),
                "temps": temps,
                "outcome": outcome,
            }
        )
        if outcome == 1:
            continue
        # The kill came first: generation i-1 is still there and stays the expected old one.
        generation -= 1 if outcome == 0 else 0
        if outcome == 2:
            break
    # One more save, not killed: it must remove the temporary files of the dead savers.
    pid, r = fork_and_save(path, generation + 1, numel, False)
    os.read(r, 1)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    final = {
        "exit": os.waitstatus_to_exitcode(status),
        "outcome": check(path, generation + 1, numel),
        "listing": sorted(os.listdir(directory)),
    }
    json.dump({"window": window, "iterations": iterations, "final": final}, sys.stdout)


if __name__ == "__main__":
    main()
