"""Tests run on CPU with 4 fake devices, so pmap paths are exercised without accelerators."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
_made_cache_dir = None  # the compilation cache this process made, removed when the session ends
if os.environ.get("JAXGPT_TEST_XLA_CACHE", "1") == "1":
    # One persistent XLA compilation cache for the session, its xdist workers and the CLI
    # subprocesses it starts: the end-to-end tests compile the same tiny programs from fresh
    # closures, which JAX's in-memory caches tell apart and the persistent cache (keyed on the
    # program) shares. Workers inherit the controller's folder through the environment.
    import tempfile

    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        _made_cache_dir = tempfile.mkdtemp(prefix="jaxgpt-test-xla-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = _made_cache_dir
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

# Most tests' time is XLA compiling tiny programs, not running them: there its LLVM passes run at
# their lowest (`jax_disable_most_optimizations`; the HLO passes, fusion included, are the same),
# a quarter off the default suite. Tests marked `optimized` (long runs whose time is running the
# program) get full optimisation, as users do. Setting JAX_DISABLE_MOST_OPTIMIZATIONS yourself wins.
_OPT_ENV = "JAX_DISABLE_MOST_OPTIMIZATIONS"
_opt_fixed = _OPT_ENV in os.environ


def pytest_runtest_setup(item):
    if _opt_fixed:
        return
    low = item.get_closest_marker("optimized") is None
    os.environ[_OPT_ENV] = "1" if low else "0"  # for the CLI subprocesses a test starts
    import jax

    jax.config.update("jax_disable_most_optimizations", low)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session):
    """An xdist worker's tests are done: let it exit on its own. JAX frees its executables
    as the worker tears down, which can take longer than the 5 s after which execnet sends
    the worker a SIGINT, surfacing as a KeyboardInterrupt warning in JAX's gc callback."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)


def pytest_unconfigure(config):
    """Remove the compilation cache this session made (it grows with every program compiled)."""
    if _made_cache_dir:
        import shutil

        shutil.rmtree(_made_cache_dir, ignore_errors=True)


@pytest.fixture
def tiny_model_cfg():
    from jaxgpt.config import ModelConfig

    return ModelConfig(vocab_size=97, context_length=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
