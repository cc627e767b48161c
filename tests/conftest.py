"""Tests run on CPU with 4 fake devices, so pmap paths are exercised without accelerators."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402


@pytest.fixture
def tiny_model_cfg():
    from jaxgpt.config import ModelConfig

    return ModelConfig(vocab_size=97, context_length=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
