"""The model-family interface (`jaxgpt.models`): one lookup, no family names outside the
package, logical axes for every parameter, params created already sharded, grouped-query
attention in every kernel without repeating K/V."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxgpt.config import FAMILIES, ModelConfig
from jaxgpt.models import FAMILY_MODULES, families, family_of, get_family, init_params, param_shapes
from jaxgpt.models.attention import blockwise_attention, fused_attention, reference_attention
from jaxgpt.models.family import LOGICAL_AXES
from jaxgpt.models.lora import LoRAConfig

JAXGPT = Path(__file__).resolve().parent.parent / "jaxgpt"


def test_the_config_knows_every_family():
    assert FAMILIES == tuple(FAMILY_MODULES)
    for family in families():
        assert family_of(ModelConfig(family=family.name)) is family is get_family(family.name)


def _string_constants(tree: ast.AST):
    """Every str constant of a module but its docstrings (f-string parts included)."""
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docs.add(id(body[0].value))
    return [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_no_code_outside_the_models_package_names_a_familys_params_or_builds_its_module():
    """Parameter names of every family (from its own params) appear in no string of any
    module outside jaxgpt/models (docstrings and comments may explain them), and no module
    there calls a family's module class: the rest of jaxgpt goes through `Family`."""
    names = set()
    for family in families():
        cfg = ModelConfig(family=family.name, vocab_size=64, context_length=8, n_layer=2, n_head=2, n_embd=16)
        for path in traverse_util.flatten_dict(param_shapes(cfg)):
            names.update(p for p in path[:-1] if p not in ("lm_head",))  # lm_head: every family's own head name
        names.add(family.block_prefix + "_")
    names -= set(LOGICAL_AXES)  # jaxgpt's own axis vocabulary ("mlp"), not a family's name
    module_classes = {f.module.__name__ for f in families()}
    # a name alone, or as a component of a path ("h_0/attn/c_attn", f"h_{i}")
    pattern = re.compile(r"(^|/)(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + r")($|/)")
    offenders = []
    for path in sorted(JAXGPT.rglob("*.py")):
        if path.relative_to(JAXGPT).parts[0] == "models":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for const in _string_constants(tree):
            if pattern.search(const.value):
                offenders.append(f"{path.relative_to(JAXGPT)}:{const.lineno}: {const.value!r}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in module_classes:
                offenders.append(f"{path.relative_to(JAXGPT)}:{node.lineno}: {node.func.id}(...)")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_parameter_has_logical_axes(name):
    """Each family names the axes of every parameter of an LM, a LoRA classifier and a PPO
    policy (a LoRA adapter excepted: replicated under `tensor`), one name per dimension."""
    cfg = ModelConfig(family=name, vocab_size=64, context_length=8, n_layer=2, n_head=4, n_embd=32)
    family = family_of(cfg)
    for attrs in ({}, {"num_classes": 3, "lora": LoRAConfig(rank=2)}, {"value_head": True}):
        for path, leaf in traverse_util.flatten_dict(param_shapes(cfg, **attrs)).items():
            axes = family.logical_axes(path, leaf.shape)
            assert len(axes) == len(leaf.shape), path
            assert set(axes) <= set(LOGICAL_AXES) | {None}, (path, axes)
            if path[-1] not in ("lora_a", "lora_b") and path != ("value_head", "bias"):
                assert any(axes), f"{'/'.join(path)} {leaf.shape} has no logical axis"


def test_params_are_created_sharded_and_equal_a_jitted_init():
    """A mesh's params come out of one jitted init in their shardings (never whole on one
    device), with the values of the same init jitted on one device."""
    from jaxgpt.parallel import MeshParallel
    from jaxgpt.parallel.mesh import param_spec

    cfg = ModelConfig(vocab_size=97, context_length=16, n_layer=1, n_head=2, n_embd=128, dropout=0.0)
    layout = MeshParallel(1, 2, 2, model=cfg)
    init = lambda key: init_params(cfg, key)  # noqa: E731
    sharded = layout.initialise(init, jax.random.key(0))
    whole = jax.jit(init)(jax.random.key(0))
    for (path, a), b in zip(traverse_util.flatten_dict(sharded).items(), traverse_util.flatten_dict(whole).values()):
        assert a.sharding.spec == param_spec(path, a.shape, 2, 2, cfg), path
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert "fsdp" in str(sharded["h_0"]["mlp"]["c_fc"]["kernel"].sharding.spec)


# ---------------------------------------------------------------------------------------
# Grouped-query attention: K/V of fewer heads, never repeated per query head

def _gqa_inputs(heads=4, kv=2, t=10, d=8, b=2):
    k = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(k[0], (b, t, heads, d))
    kk = jax.random.normal(k[1], (b, t, kv, d))
    v = jax.random.normal(k[2], (b, t, kv, d))
    g = jax.random.normal(k[3], (b, t, heads, d))
    return q, kk, v, g


@pytest.mark.parametrize("heads, kv", [(4, 2), (4, 1)])
def test_grouped_kernels_equal_the_reference_on_repeated_kv(heads, kv):
    """Every kernel with `kv` key/value heads == the plain reference with K/V repeated per
    query head (the definition of GQA): outputs and q, k, v gradients, causal and padded
    (float32, 1e-5)."""
    q, k, v, g = _gqa_inputs(heads, kv)
    t = q.shape[1]
    valid = jnp.arange(t)[None, :] < jnp.array([[t], [t - 3]])  # the second row padded
    masks = {"causal": jnp.tril(jnp.ones((t, t), bool))[None, None],
             "padded": jnp.tril(jnp.ones((t, t), bool))[None, None] & valid[:, None, None, :] | jnp.eye(t, dtype=bool)}
    rep = lambda x: jnp.repeat(x, heads // kv, axis=2)  # noqa: E731

    def grads(fn):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(g))

    @jax.jit
    def run():
        res = {}
        for name, mask in masks.items():
            causal = name == "causal"
            want = grads(lambda q, k, v: reference_attention(q, rep(k), rep(v), mask))
            res[name] = (want, {
                "reference": grads(lambda q, k, v: reference_attention(q, k, v, mask)),
                "blockwise": grads(lambda q, k, v: blockwise_attention(q, k, v, None if causal else mask,
                                                                       is_causal=causal, block_q=4, block_k=4)),
                "xla": grads(lambda q, k, v: fused_attention(q, k, v, mask, implementation="xla", is_causal=causal)),
            })
        return res

    for name, (want, got) in run().items():
        for kernel, values in got.items():
            for w, x, what in zip(want, values, ("out", "dq", "dk", "dv")):
                np.testing.assert_allclose(x, w, rtol=1e-5, atol=1e-5, err_msg=f"{name} {kernel} {what}")


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_all_adapts_the_familys_dense_layers(name):
    """`lora.targets: [all]` (the default) adapts exactly the family's `lora_targets` in every
    block, plus a classifier's `score` head, never the LM head (GPT-2: c_attn, both c_proj,
    c_fc, score: the targets GPT-2 runs always had)."""
    cfg = ModelConfig(family=name, vocab_size=64, context_length=8, n_layer=2, n_head=4, n_embd=32, tie_embeddings=False)
    family = family_of(cfg)
    for num_classes, head in ((0, ()), (2, ("score",))):
        shapes = param_shapes(cfg, num_classes=num_classes, lora=LoRAConfig(rank=2))
        adapted = {path[:-1] for path in traverse_util.flatten_dict(shapes) if path[-1] == "lora_a"}
        assert {p[-1] for p in adapted} == set(family.lora_targets) | set(head)
        per_block = [{p[1:] for p in adapted if p[0] == family.block(i)} for i in range(cfg.n_layer)]
        assert per_block[0] and all(b == per_block[0] for b in per_block)  # every block alike
        assert ("lm_head",) not in adapted
