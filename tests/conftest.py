"""Shared fixtures for metagrad's tests, and the session's JAX compilation cache."""

import os

# -- fast XLA compiles for the whole session ------------------------------------------------------
# The suite compiles thousands of small programs and runs each a few times, so XLA's compile
# time, not the programs' run time, is most of its cost. Without LLVM's backend optimizations
# and with the classic CPU emitters XLA compiles about twice as fast here (measured: half the
# CPU time of tests/test_maml.py + test_inner_mask.py, and of test_experiment_synthetic.py +
# test_fewshot.py); the programs compute the same operations, in float32 to within rounding.
# Set before JAX starts its backend, in the environment so that the xdist workers and every
# subprocess (multi-device checks, notebooks) inherit it. METAGRAD_TEST_XLA_DEFAULTS=1 keeps
# XLA's defaults.
_FAST_COMPILE_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
    "--xla_cpu_use_fusion_emitters=false",
)
if not os.environ.get("METAGRAD_TEST_XLA_DEFAULTS"):
    _flags = os.environ.get("XLA_FLAGS", "")
    _missing = [f for f in _FAST_COMPILE_FLAGS if f.split("=")[0] not in _flags]
    os.environ["XLA_FLAGS"] = " ".join([_flags, *_missing]).strip()

import jax  # noqa: E402 - after XLA_FLAGS
import pytest  # noqa: E402

# -- one compilation cache for the session -----------------------------------------------------
# Many tests build a new transformation or learner for each check, and JAX compiles each again
# (the conformance battery alone compiles a few thousand small programs). Most of these
# programs are the same computation: with JAX's persistent compilation cache, the second
# compilation of the same program is a read of the first one, also across the xdist workers
# and in the multi-device subprocesses (they inherit the environment set below).
#
# The cache is new for each session (under pytest's base temporary directory, which pytest
# prunes to the last 3 sessions), so that a run's time is the time of a fresh clone. Setting
# JAX_COMPILATION_CACHE_DIR yourself keeps your directory (e.g. a cache kept between CI runs);
# JAX_ENABLE_COMPILATION_CACHE=false turns the cache off.
_CACHE_ENV = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",  # the battery's programs are small
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}


def _compilation_cache_dir(config) -> str:
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    basetemp = config._tmp_path_factory.getbasetemp()
    # An xdist worker's base directory is <the session's>/popen-gwN: the workers share the parent.
    root = basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp
    return str(root / "jax-compilation-cache")


@pytest.hookimpl(trylast=True)  # after pytest's tmp_path plugin
def pytest_configure(config):
    # Before any compilation: JAX decides at the first one whether the process uses the cache.
    path = _compilation_cache_dir(config)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    for name, value in _CACHE_ENV.items():
        os.environ.setdefault(name, value)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update(
        "jax_persistent_cache_min_compile_time_secs",
        float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
    )
    jax.config.update(
        "jax_persistent_cache_min_entry_size_bytes",
        int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]),
    )


# -- xdist groups under pytest 9 ----------------------------------------------------------------
# `--dist loadgroup` (pyproject addopts) keeps the tests of one `xdist_group` on one worker:
# the battery's cells of a method share its baseline run, and the modules whose checks run in
# one subprocess (multi-device, notebooks) must not have a worker wait on the other's
# subprocess. pytest-xdist 3.8 groups by appending "@<group>" to a test's node id through
# `item._nodeid`; pytest 9 keeps the id in `item._id`, so the suffix was lost and every group
# was split over the two workers (seen in a -v run: each method's cells on both workers, one
# worker blocked on the other's subprocess lock). This does what xdist means to, on pytest 9;
# it does nothing where xdist's own suffix is already there.


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    if not (os.environ.get("PYTEST_XDIST_WORKER") and config.getvalue("loadgroup")):
        return
    try:
        from _pytest.nodeid import NodeId
    except ImportError:  # pytest < 9: xdist's own suffix works
        return
    for item in items:
        names = {
            str(m.args[0] if m.args else m.kwargs.get("name", "default"))
            for m in item.iter_markers("xdist_group")
        }
        if names and "@" not in item.nodeid and hasattr(item, "_id"):
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(sorted(names))}")


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def x64():
    """Runs a test with 64-bit floats enabled, restoring the setting after."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)
