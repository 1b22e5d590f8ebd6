"""Helpers shared by the tests."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_on_four_devices(args: list[str]) -> Any:
    """Runs ``python *args`` with 4 faked CPU devices; returns its ``RESULT <json>`` line.

    The device count must be set before JAX starts, hence a subprocess. The repository root
    is put on its ``PYTHONPATH`` so it imports this checkout's metagrad. The result is kept
    for the test process (a module fixture is set up again when its module's tests are
    interleaved with others on a worker; the subprocess need not run again).
    """
    return _run(tuple(args))


@functools.cache
def _run(args: tuple[str, ...]) -> Any:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])
