"""dsv3_torch and dsv3_jax mirror each other: the same modules, public classes and functions, and per class
the same public attribute and method names. Differences a framework idiom demands are listed below, each
with its reason; anything else that exists on one side only fails here."""

from __future__ import annotations

import dataclasses
import importlib
import inspect

import pytest

MODULES = ["norm", "rope", "layers", "mla", "moe", "block", "mtp", "model", "generate", "train", "speculative"]

# Public module-level names one framework has and the other has not: (module, framework) -> {name: reason}.
ONLY_IN = {
    ("layers", "jax"): {
        "dense": "XLA:CPU runs a matmul's backward on [B, T, D] much slower than on the flattened 2-D rows",
        "normal_init": "Flax initialises in the constructors (torch: DeepSeekV3.reset_parameters)",
        "const": "a host-placed constant for the Flax initialisers (no per-shape compile)",
        "row_max": "XLA:CPU's split reduce-window max is 2-4x slower than a max by halves (torch's max is fast)",
        "softmax": "jax.nn.softmax with the row max of row_max, bit for bit (torch: F.softmax / SDPA)",
        "log_softmax": "jax.nn.log_softmax with the row max of row_max, bit for bit (torch: F.cross_entropy)",
    },
    ("moe", "jax"): {
        "RouterBias": "an nnx.Variable type keeps the bias out of nnx.Param (torch: a registered buffer)",
        "silu": "SiLU in fp32 rounded once, as torch's bf16 F.silu kernel does",
        "default_block_rows": "block size of the JAX block-sparse expert matmul (torch loops over experts)",
        "default_chunk_rows": "rows per matmul of the JAX expert loop (torch's loop takes each expert's rows whole)",
        "stable_argsort": "XLA:CPU's stable argsort is 5x slower than a sort of unique keys (torch.argsort's is fast)",
    },
    ("layers", "torch"): {
        "compute_dtype": "the dtype torch.autocast computes a matmul in (JAX: dtypes are explicit)",
        "Linear": "nn.Linear whose fp32 CPU product is dsv3_torch.cpu_matmul's (oneDNN where MKL runs AVX2 "
                  "on AVX-512 units; JAX: XLA:CPU picks its own kernels)",
    },
    ("moe", "torch"): {
        "group_sizes": "split() takes host ints; under torch.compile they are data-dependent symbols "
                       "(JAX: the counts stay an array for the block-sparse matmul)",
        "grouped_swiglu": "eager per-expert products written into whole buffers, shared with the expert-parallel "
                          "experts (JAX: the expert loop, a custom VJP inside the compiled step)",
        "weights_for": "the stacked expert weights cast once to torch.autocast's compute dtype, shared with the "
                       "expert-parallel experts (JAX: dtypes are explicit)",
    },
    ("train", "torch"): {
        "compile_loss": "torch.compile of the loss with the row counts captured as symbols (JAX: nnx.jit)",
        "adamw": "torch.optim.AdamW with its fused kernel (JAX: make_tx, the optax optimizer)",
        "sum_of_squares": "the gradient norm's sum of squares as chunked dot products, no squared temporary "
                          "(JAX: optax.clip_by_global_norm, fused by XLA)",
    },
    ("train", "jax"): {
        "scale_by_lr_arg": "optax transform taking the learning rate per step (torch: param_groups lr)",
        "decay_mask": "optax weight-decay mask (torch: two AdamW param groups)",
        "make_tx": "the optax optimizer (torch: adamw, torch.optim.AdamW)",
    },
}

# Classes that play the same role under framework-named class names.
SAME_ROLE = {("train", "TorchBackend"): "JaxBackend"}

# Public class members one framework has and the other has not: (class, framework) -> {name: reason}.
MEMBER_ONLY_IN = {
    ("DeepSeekV3", "torch"): {"reset_parameters": "torch modules are built empty and initialised after; "
                                                  "Flax initialises in the constructors from rngs"},
    ("DeepSeekV3", "jax"): {"scan_layers": "JAX layer layout: the main layers as two scanned stacks (opt-in)",
                            "remat": "JAX activation checkpointing per layer (jax.checkpoint policies)",
                            "dense_stack": "the stacked dense layers of a scan_layers model",
                            "moe_stack": "the stacked MoE layers of a scan_layers model"},
    ("JaxBackend", "jax"): {"lower_train_step": "the sharded step lowered by jax.jit, for its compiled HLO "
                                                "(dsv3_jax.hlo counts the collectives); torch has no such stage"},
    ("RMSNorm", "torch"): {"extra_repr": "torch's module repr hook"},
    ("RotaryEmbedding", "torch"): {"inv_freq": "torch keeps the fp32 tensor; JAX recomputes it as a static "
                                               "numpy constant (a jax array attribute would be a pytree leaf)"},
    ("Experts", "jax"): {"impl": "JAX grouped-matmul backend (loop | blocksparse | ragged); torch has one loop",
                         "resolved_impl": "JAX grouped-matmul backend for the current device"},
    ("LocalDispatcher", "jax"): {"gspmd": "JAX: the layer is partitioned by GSPMD on a mesh (the experts then run "
                                          "block-sparse); torch's meshes shard explicitly"},
}


def _mod(fw: str, name: str):
    return importlib.import_module(f"dsv3_{fw}.{name}")


def _public(mod) -> dict:
    """Public classes and functions defined in the module itself (imports excluded)."""
    return {n: o for n, o in vars(mod).items() if not n.startswith("_") and (inspect.isclass(o) or callable(o))
            and getattr(o, "__module__", None) == mod.__name__}


def _methods(cls) -> set[str]:
    """Public methods and properties defined by the project's own classes in the MRO; torch's
    ``forward`` is reported as ``__call__`` (nn.Module calls forward, nnx.Module is called)."""
    names = set()
    for k in cls.__mro__:
        if not k.__module__.startswith(("dsv3_torch", "dsv3_jax")):
            continue
        for n, o in vars(k).items():
            if n == "forward" or (n == "__call__" and k.__module__.startswith("dsv3_jax")):
                names.add("__call__")
            elif not n.startswith("_") and (inspect.isfunction(o) or isinstance(o, (property, classmethod,
                                                                                        staticmethod))):
                names.add(n)
    return names


def _attributes(obj) -> set[str]:
    """Public instance attributes: parameters, buffers, sub-modules and plain attributes."""
    names = {n for n in vars(obj) if not n.startswith("_") and n != "training"}
    for store in ("_parameters", "_buffers", "_modules"):  # torch nn.Module registries
        names |= set(getattr(obj, store, {}))
    return names


def _allowed(table: dict, key, fw: str) -> set[str]:
    return set(table.get((key, fw), {}))


@pytest.mark.parametrize("name", MODULES)
def test_same_files_and_public_names(name):
    t, j = _public(_mod("torch", name)), _public(_mod("jax", name))
    for (mod, tname), jname in SAME_ROLE.items():
        if mod == name:
            t[jname] = t.pop(tname)
    t_only = set(t) - set(j) - _allowed(ONLY_IN, name, "torch")
    j_only = set(j) - set(t) - _allowed(ONLY_IN, name, "jax")
    assert not t_only and not j_only, f"{name}: only in dsv3_torch {sorted(t_only)}, only in dsv3_jax {sorted(j_only)}"


@pytest.mark.parametrize("name", MODULES)
def test_same_methods_per_class(name):
    t, j = _public(_mod("torch", name)), _public(_mod("jax", name))
    for (mod, tname), jname in SAME_ROLE.items():
        if mod == name:
            t[jname] = t.pop(tname)
    for cname in sorted(set(t) & set(j)):
        tc, jc = t[cname], j[cname]
        if not inspect.isclass(tc):
            continue
        if hasattr(tc, "_fields"):  # NamedTuple: the same fields in the same order
            assert tc._fields == jc._fields, f"{cname}: {tc._fields} vs {jc._fields}"
            continue
        tm = _methods(tc) - _allowed(MEMBER_ONLY_IN, cname, "torch")
        jm = _methods(jc) - _allowed(MEMBER_ONLY_IN, cname, "jax")
        assert tm == jm, f"{cname}: only in dsv3_torch {sorted(tm - jm)}, only in dsv3_jax {sorted(jm - tm)}"


def _instances(fw: str, cfg) -> dict:
    """One tiny instance of every module class (and the cache, the dispatcher), reached from a model."""
    if fw == "torch":
        import dsv3_torch as pkg
        m = pkg.DeepSeekV3(cfg)
    else:
        from flax import nnx

        import dsv3_jax as pkg
        m = pkg.DeepSeekV3(cfg, nnx.Rngs(0))
    dense, moe = m.layers[0], m.layers[cfg.first_k_dense_replace]
    return {"DeepSeekV3": m, "Block": moe, "MLA": moe.attn, "RMSNorm": moe.attn_norm, "MoE": moe.ffn,
            "Router": moe.ffn.gate, "Experts": moe.ffn.experts, "LocalDispatcher": moe.ffn.dispatcher,
            "MLP": dense.ffn, "MTPModule": m.mtp[0], "RotaryEmbedding": m.rope, "KVCache": m.init_cache(1, 4)}


def test_same_attributes_per_instance():
    from dsv3.config import ModelConfig

    cfg = ModelConfig.preset("tiny")
    assert cfg.first_k_dense_replace > 0 and cfg.n_shared_experts and cfg.num_nextn_predict_layers
    t, j = _instances("torch", cfg), _instances("jax", cfg)
    for cname in t:
        ta = _attributes(t[cname]) - _allowed(MEMBER_ONLY_IN, cname, "torch")
        ja = _attributes(j[cname]) - _allowed(MEMBER_ONLY_IN, cname, "jax")
        assert ta == ja, f"{cname}: only in dsv3_torch {sorted(ta - ja)}, only in dsv3_jax {sorted(ja - ta)}"
    for cname in ("KVCache",):  # dataclasses: the same fields in the same order
        tf = [f.name for f in dataclasses.fields(t[cname])]
        jf = [f.name for f in dataclasses.fields(j[cname])]
        assert tf == jf, f"{cname}: {tf} vs {jf}"
