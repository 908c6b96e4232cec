"""OpenMP's barrier waits for sluice's processes, set before the OpenMP runtime loads.

libgomp (the OpenMP of torch's CPU build and of sluice's C++ kernels on Linux) lets a thread
that reaches a barrier, or waits for the next parallel region, spin for GOMP_SPINCOUNT
iterations (300,000 by default: about a millisecond) before it sleeps. A decode step runs a
few hundred short parallel regions. When another process holds one of the cores (the API
server beside the engine, a second engine, a build), the thread everyone waits for is often
the one descheduled, and the spinning threads keep the core from it: on a 2-core VM with one
busy-looping process beside it, SmolLM2-135M bf16 W1 fell from ~900 to 64-78 output tok/s
with the default, and ran at 273-290 with GOMP_SPINCOUNT=10000; on the quiet machine the two
measured 909 and 891 tok/s (medians of 2 alternating rounds; within the run-to-run noise).

libgomp reads the variable once, when it is loaded (with torch), so `apply_openmp_defaults()`
runs at `import sluice`, before sluice imports torch; processes sluice starts (engines,
workers) inherit the environment. A program that imported torch before sluice keeps libgomp's
default in its own process. A value the user set — GOMP_SPINCOUNT or OMP_WAIT_POLICY — is
kept. Stdlib only: `import sluice` stays fast and torch-free.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SPIN_COUNT = "10000"
"""GOMP_SPINCOUNT for sluice's processes (see the module doc)."""


def apply_openmp_defaults(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set GOMP_SPINCOUNT = SPIN_COUNT in `environ` unless GOMP_SPINCOUNT or OMP_WAIT_POLICY is
    already set. Returns whether it set it."""
    if "GOMP_SPINCOUNT" in environ or "OMP_WAIT_POLICY" in environ:
        return False
    environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True
