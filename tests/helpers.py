"""Helpers shared by the tests."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_on_four_devices(args: list[str]) -> Any:
    """Runs ``python *args`` with 4 faked CPU devices; returns its ``RESULT <json>`` line.

    The device count must be set before JAX starts, hence a subprocess. The repository root
    is put on its ``PYTHONPATH`` so it imports this checkout's metagrad. The result is kept
    for the test process (a module fixture is set up again when its module's tests are
    interleaved with others on a worker; the subprocess need not run again).
    """
    return _shared(tuple(args))


@functools.cache
def _shared(args: tuple[str, ...]) -> Any:
    # Under pytest-xdist the workers of one run share a run id: the first worker to get here
    # runs the subprocess and leaves its result in a file; the others wait on the lock and read
    # it (a module's tests can be spread over workers).
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run_id is None:
        return _run(args)
    key = hashlib.sha256("\0".join(args).encode()).hexdigest()[:16]
    path = pathlib.Path(tempfile.gettempdir()) / f"metagrad-devices-{run_id}-{key}.json"
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return json.loads(path.read_text())
        result = _run(args)
        path.write_text(json.dumps(result))
        return result


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
