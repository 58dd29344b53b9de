"""How prefixcap's threads wait, set before torch loads OpenMP (prefixcap/__init__.py; benchmarks/threads.py measures
why: beside another busy process, spinning threads made training many times slower than a fair share)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = "import os, prefixcap, torch; torch.ones(2) + 1; print(os.environ.get('OMP_WAIT_POLICY'))"


def wait_policy(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", CODE], env={**clean, **env}, capture_output=True, text=True,
                         check=True, timeout=300)  # fmt: skip
    return out.stdout.strip()


def test_threads_wait_passively_unless_the_user_chose():
    assert wait_policy() == "PASSIVE"


@pytest.mark.parametrize("env", [{"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "300000"}])
def test_a_users_own_choice_stands(env):
    assert wait_policy(**env) == env.get("OMP_WAIT_POLICY", "None")
