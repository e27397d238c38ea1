"""Process-wide settings the package makes on import."""

import os
import subprocess
import sys


def test_jemalloc_decay_is_set_before_polars_loads_and_user_value_wins() -> None:
    probe = ("import os, pipeline, polars; print(os.environ['_RJEM_MALLOC_CONF'])")
    env = {k: v for k, v in os.environ.items() if k != "_RJEM_MALLOC_CONF"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out.endswith(",dirty_decay_ms:2000,muzzy_decay_ms:0")  # after polars': it wins
    env["_RJEM_MALLOC_CONF"] = "dirty_decay_ms:500"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out.endswith(",dirty_decay_ms:500") and "muzzy_decay_ms:0" not in out
