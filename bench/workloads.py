"""Deterministic benchmark workloads (shared by the demo and the benchmarks); the code lives in
ckptio.benchmark.workloads so that ``ckptio bench`` can use it."""

from __future__ import annotations

from ckptio.benchmark.workloads import Workload, build, gpt2_medium_state_dict

__all__ = ["Workload", "build", "gpt2_medium_state_dict"]
