"""Running loads in a child process: a crash or a hang there fails a test, not the run."""

from __future__ import annotations

import os
import subprocess
import sys


def child_env() -> dict[str, str]:
    """The environment for a child that imports ckptio: CKPTIO_TEST_PYTHONPATH (set by
    `make asan-py` to the sanitizer build) goes first on its path."""
    env = dict(os.environ)
    extra = env.get("CKPTIO_TEST_PYTHONPATH")
    if extra:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra, env.get("PYTHONPATH")) if p)
    return env


def run_child(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Runs `script` with `args` in a fresh interpreter; returns its completed process."""
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
    )


LIMIT_MEMORY = """
import resource

def limit_memory(extra):
    # Address space: what the interpreter (torch included) maps now, plus `extra`.
    with open("/proc/self/status") as f:
        vm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + extra, vm + extra))
"""
