"""Tests run on CPU with 4 fake devices, so pmap paths are exercised without accelerators."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if os.environ.get("JAXGPT_TEST_XLA_CACHE", "1") == "1":
    # One persistent XLA compilation cache for the session and the CLI subprocesses it starts:
    # the end-to-end tests compile the same tiny programs from fresh closures, which JAX's
    # in-memory caches tell apart and the persistent cache (keyed on the program) shares.
    import tempfile

    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jaxgpt-test-xla-"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402


@pytest.fixture
def tiny_model_cfg():
    from jaxgpt.config import ModelConfig

    return ModelConfig(vocab_size=97, context_length=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
