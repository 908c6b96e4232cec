"""sluice.openmp_env: GOMP_SPINCOUNT set at `import sluice` unless the user chose a wait policy."""

from __future__ import annotations

import os
import subprocess
import sys

from sluice.openmp_env import SPIN_COUNT, apply_openmp_defaults


def test_sets_the_spin_count_unless_the_user_chose_one():
    env: dict[str, str] = {}
    assert apply_openmp_defaults(env) and env == {"GOMP_SPINCOUNT": SPIN_COUNT}
    for user in ({"GOMP_SPINCOUNT": "300000"}, {"OMP_WAIT_POLICY": "active"}):
        env = dict(user)
        assert not apply_openmp_defaults(env) and env == user


def _spin_count_seen_by_a_fresh_interpreter(extra_env: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = ("import sys, os, sluice; "
            "print('torch' in sys.modules, os.environ.get('GOMP_SPINCOUNT'))")
    out = subprocess.run([sys.executable, "-c", code], env={**env, **extra_env},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False"          # set before torch (and its libgomp) could load
    return out[1]


def test_import_sluice_sets_it_before_torch_and_keeps_the_users_value():
    assert _spin_count_seen_by_a_fresh_interpreter({}) == SPIN_COUNT
    assert _spin_count_seen_by_a_fresh_interpreter({"GOMP_SPINCOUNT": "5"}) == "5"
    assert _spin_count_seen_by_a_fresh_interpreter({"OMP_WAIT_POLICY": "passive"}) == "None"
