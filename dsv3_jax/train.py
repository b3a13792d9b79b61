"""JAX / optax training backend for `dsv3 train --framework jax` (driver: dsv3.training).

One optimizer step is ONE `nnx.jit`-compiled call (docs/reference.md §8, §10):

    grads, counts = sum over micro-batches (jax.lax.scan) of grad(compute_loss), counts
    grads /= k                                      # the mean over the step's sequences
    optimizer.update(model, grads, lr=lr, eps=eps, weight_decay=wd)  # clip -> Adam -> decay (mask) -> -lr
    model.update_router_bias(counts, gamma)         # once, summed counts; RouterBias is not a Param
    keep the old model and optimizer state unless loss and gradient norm are finite

The optimizer is ``nnx.Optimizer(model, tx, wrt=nnx.Param)``, so neither the
gradient, the clipping, the decay nor the Adam moments ever see the router
bias. The learning rate comes from the shared plain-Python schedule
(`dsv3.training.lr_at`) as a traced scalar argument, so the compiled step is
reused for every step; Adam's eps and the decay rate are traced arguments too,
so runs that differ only in them share it. Evaluation is a separate jitted function that returns
losses and changes nothing.

``dtype="bfloat16"``: fp32 master weights and optimizer state; the loss is
computed by a bf16 twin of the model (same graph built with dtype=bfloat16)
into which the fp32 parameters are cast inside the step, so gradients flow
back to fp32 through the casts.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dsv3.config import ModelConfig
from dsv3.train_config import TrainConfig, check_optimizer_args, decays
from dsv3_jax.model import DeepSeekV3


def scale_by_lr_arg() -> optax.GradientTransformationExtraArgs:
    """updates * -lr, with lr given to `update(..., lr=...)` each step (no schedule inside optax)."""

    def init_fn(params):
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, lr, **extra):
        return jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _path_name(path) -> str:
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))))
    return ".".join(parts)


def decay_mask(params):
    """True where AdamW decays: the shared rule of dsv3.training.decays, by parameter path."""
    return jax.tree_util.tree_map_with_path(lambda p, x: decays(_path_name(p), jnp.ndim(x)), params)


def make_tx(tcfg: TrainConfig) -> optax.GradientTransformationExtraArgs:
    """clip -> Adam -> decoupled decay (mask) -> -lr. ``eps``, the decay rate and ``lr`` are not
    baked in: ``update`` takes them as arguments (`_tx_args`), so one compiled step serves every
    run that differs only in them; the state is that of optax's own transformations."""
    check_optimizer_args(tcfg.lr, tcfg.beta1, tcfg.beta2, tcfg.eps, tcfg.weight_decay, tcfg.grad_clip)
    return _tx(tcfg.grad_clip, tcfg.beta1, tcfg.beta2)


def _tx_args(tcfg: TrainConfig) -> dict:
    """The per-step arguments of `make_tx`'s ``update`` besides ``lr``: Adam's eps and the decay rate."""
    return {"eps": tcfg.eps, "weight_decay": tcfg.weight_decay}


def _scale_by_adam_eps_arg(b1: float, b2: float) -> optax.GradientTransformationExtraArgs:
    """optax.scale_by_adam (same state) with eps given to `update(..., eps=...)`."""

    def init_fn(params):
        return optax.scale_by_adam(b1=b1, b2=b2).init(params)

    def update_fn(updates, state, params=None, *, eps, **extra):
        return optax.scale_by_adam(b1=b1, b2=b2, eps=eps).update(updates, state, params)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _decay_arg() -> optax.GradientTransformationExtraArgs:
    """optax.add_decayed_weights(rate, mask=decay_mask) (same state) with the rate given to
    `update(..., weight_decay=...)`."""

    def init_fn(params):
        return optax.add_decayed_weights(0.0, mask=decay_mask).init(params)

    def update_fn(updates, state, params=None, *, weight_decay, **extra):
        return optax.add_decayed_weights(weight_decay, mask=decay_mask).update(updates, state, params)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@functools.lru_cache(maxsize=None)
def _tx(grad_clip: float, b1: float, b2: float):
    # Memoised: the transformation is static in the optimizer's graph, so an equal object lets a
    # new backend with the same static hyper-parameters reuse the compiled step (tests, resume).
    parts = []
    if grad_clip > 0:
        parts.append(optax.clip_by_global_norm(grad_clip))
    # The decay is always in the chain (a rate of 0 adds 0 * w: the update is unchanged) and has no
    # array state, so the optimizer state has the same leaves whatever the rate.
    parts += [_scale_by_adam_eps_arg(b1, b2), _decay_arg(), scale_by_lr_arg()]
    return optax.chain(*parts)


def _flat(state) -> dict[str, np.ndarray]:
    return {".".join(str(p) for p in path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}


class JaxBackend:
    def __init__(self, cfg: ModelConfig, tcfg: TrainConfig, model: DeepSeekV3 | None = None, mesh=None):
        """``mesh``: a ``jax.sharding.Mesh`` from ``dsv3_jax.sharding.make_mesh`` (None: one device).

        On a mesh the model and the AdamW state are placed per ``dsv3_jax.sharding.RULES``, each
        batch is split over every mesh axis, and the same step runs under GSPMD with its outputs
        pinned to the same shardings."""
        self.model_cfg, self.tcfg = cfg, tcfg
        layout = (tcfg.scan_layers, tcfg.remat) if model is None else (model.scan_layers, model.remat)
        self.model = model if model is not None else DeepSeekV3(cfg, rngs=nnx.Rngs(tcfg.seed), dtype=jnp.float32,
                                                                scan_layers=layout[0], remat=layout[1])
        self.mesh = mesh
        self.optimizer = nnx.Optimizer(self.model, make_tx(tcfg), wrt=nnx.Param)
        self.gamma = float(cfg.bias_update_speed)
        bf16_cfg = cfg if tcfg.dtype == "bfloat16" else None
        self._eval = _eval_step(bf16_cfg, layout)
        if mesh is not None:
            from dsv3_jax.expert_parallel import use_expert_parallel

            self._place()
            use_expert_parallel(self.model, mesh)  # expert > 1: the MoE layers exchange tokens over `expert`
        self._train = _split_train_step(bf16_cfg, self.model, self.optimizer, mesh)

    def _place(self) -> None:
        """(Re)place the model and optimizer state on the mesh (after init or a load)."""
        from dsv3_jax import sharding

        sharding.shard_model(self.model, self.mesh)
        sharding.shard_optimizer(self.optimizer, self.model, self.mesh)

    def _put_batch(self, a: np.ndarray, batch_dim: int) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(a, jnp.int32)
        from dsv3_jax import sharding

        n = sharding.mesh_size(sharding.mesh_shape(self.mesh))
        if a.shape[batch_dim] % n:
            raise ValueError(f"the micro-batch of {a.shape[batch_dim]} sequences does not split over the mesh "
                             f"{sharding.format_mesh(sharding.mesh_shape(self.mesh))} ({n} devices): use a "
                             f"multiple of {n} sequences per micro-batch")
        return sharding.global_array(np.asarray(a, np.int32), sharding.batch_sharding(self.mesh, a.ndim, batch_dim))

    # ------------------------------------------------------------- train
    def _step_args(self, micro_batches, lr: float) -> tuple:
        xs = self._put_batch(np.stack([x for x, _ in micro_batches]), 1)
        ys = self._put_batch(np.stack([y for _, y in micro_batches]), 1)
        hp = {"lr": jnp.float32(lr)} | {k: jnp.float32(v) for k, v in _tx_args(self.tcfg).items()}
        return self.model, self.optimizer, xs, ys, hp, jnp.float32(self.gamma)

    def lower_train_step(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]], lr: float):
        """The sharded step lowered for these micro-batches (``.compile().as_text()``: the HLO that
        runs, collectives included; ``dsv3_jax.hlo.count_collectives`` counts them). Mesh only."""
        if self.mesh is None:
            raise ValueError("lower_train_step: a backend on a mesh (mesh=...)")
        return self._train.lower(*self._step_args(micro_batches, lr))

    def train_step(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]], lr: float) -> dict:
        out = self._train(*self._step_args(micro_batches, lr))
        out = jax.device_get(out)
        res = {k: float(v) for k, v in out.items() if k != "counts"}
        if not len(self.model.mtp):
            res.pop("mtp_depth_loss", None)
        res["counts"] = np.asarray(out["counts"])
        return res

    def eval_step(self, input_ids: np.ndarray, labels: np.ndarray) -> dict:
        out = jax.device_get(self._eval(self.model, self._put_batch(np.asarray(input_ids), 0),
                                        self._put_batch(np.asarray(labels), 0)))
        res = {"main_loss": float(out["main_loss"])}
        if len(self.model.mtp):
            res["mtp_depth_loss"] = float(out["mtp_depth_loss"])
        return res

    # ------------------------------------------------------------ state
    def canonical_state(self) -> dict[str, np.ndarray]:
        return self.model.canonical_state()

    def load_canonical_state(self, state: dict[str, np.ndarray]) -> None:
        self.model.load_canonical_state(state)
        if self.mesh is not None:
            self._place()

    def save_pretrained(self, directory: str) -> None:
        self.model.save_pretrained(directory)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Every leaf of the nnx.Optimizer (step count, Adam mu/nu per parameter path)."""
        return _flat(nnx.state(self.optimizer))

    def load_optimizer_state(self, tensors: dict[str, np.ndarray]) -> None:
        state = nnx.state(self.optimizer)
        flat = nnx.to_flat_state(state)
        names = {".".join(str(p) for p in path) for path, _ in flat}
        missing, extra = sorted(names - set(tensors)), sorted(set(tensors) - names)
        if missing or extra:
            raise ValueError(f"optimizer state does not match: missing {missing[:10]}, unexpected {extra[:10]}")
        for path, var in flat:
            name = ".".join(str(p) for p in path)
            cur = var.get_value()
            new = np.asarray(tensors[name])
            if tuple(new.shape) != tuple(np.shape(cur)):
                raise ValueError(f"optimizer state {name}: shape {new.shape}, expected {np.shape(cur)}")
            var.set_value(jnp.asarray(new, dtype=jnp.asarray(cur).dtype))
        nnx.update(self.optimizer, nnx.from_flat_state(flat))
        if self.mesh is not None:
            self._place()


def _loss_model(model_gd, params, rest, twin):
    """The model that computes the loss: itself (fp32) or the bf16 twin fed cast parameters."""
    if twin is None:
        return nnx.merge(model_gd, params, rest)
    gd, p_abs = twin
    cast = jax.tree.map(lambda p, a: p.astype(a.dtype), params, p_abs)
    return nnx.merge(gd, cast, rest)


@functools.lru_cache(maxsize=None)
def _steps_twin(bf16_cfg: ModelConfig | None, layout: tuple[bool, str]):
    """The bf16 twin (graphdef, abstract params) of a bf16 run, None for fp32; layout: (scan_layers, remat)."""
    if bf16_cfg is None:
        return None
    abstract = nnx.eval_shape(lambda: DeepSeekV3(bf16_cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                                                 scan_layers=layout[0], remat=layout[1]))
    gd, p_abs, _ = nnx.split(abstract, nnx.Param, ...)
    return (gd, p_abs)


@functools.lru_cache(maxsize=None)
def _eval_step(bf16_cfg: ModelConfig | None, layout: tuple[bool, str]):
    """The eval step, shared by every backend of the same precision and layout (one compile cache)."""
    return _make_eval_step(_steps_twin(bf16_cfg, layout))


def _split_train_step(bf16_cfg, model, optimizer, mesh=None):
    """The step of ``_train_step_fn`` under ``jax.jit`` on the split state of this model and optimizer:
    their graphs are walked once, here, not on every call as ``nnx.jit`` would (measured in one process,
    alternating: the tiny preset's step 18.4 -> 7.6 ms; on peer-small, 834 vs 848 ms, within noise). Each
    call reads the arrays of the model's and optimizer's variables, runs the step and writes the new arrays
    back into the same variables (every load in this package sets values in place, so
    the variables stay those of the module). On a mesh (model and optimizer already placed) the new state is
    pinned to the shardings it came in with (so GSPMD cannot drift them) and the old arrays are donated.
    Same call signature as an ``nnx.jit`` step (the model and optimizer arguments are these)."""
    gd_m, st_m = nnx.split(model)
    gd_o, st_o = nnx.split(optimizer)
    leaves, treedef = jax.tree.flatten((st_m, st_o))
    variables = jax.tree.leaves((nnx.state(model), nnx.state(optimizer)), is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert len(variables) == len(leaves) and all(isinstance(v, nnx.Variable) for v in variables)
    shardings = None if mesh is None else tuple(x.sharding for x in leaves)
    jitted = _jit_split_step(bf16_cfg, mesh, gd_m, gd_o, treedef, shardings, (model.scan_layers, model.remat))

    def train_step(model, optimizer, xs, ys, hp, gamma):
        new, out = jitted([v.get_value() for v in variables], xs, ys, hp, gamma)
        for v, x in zip(variables, new):
            v.set_value(x)
        return out

    def lower(model, optimizer, xs, ys, hp, gamma):
        """The jitted step lowered for these arguments (``.compile()``: the program that runs)."""
        return jitted.lower([v.get_value() for v in variables], xs, ys, hp, gamma)

    train_step.lower = lower
    return train_step


@functools.lru_cache(maxsize=None)
def _jit_split_step(bf16_cfg, mesh, gd_m, gd_o, treedef, shardings, layout):
    """One jitted step per (precision, mesh, graph, state structure, shardings, layer layout): equal
    backends share it (one compile cache)."""
    if bf16_cfg is None:
        twin = None
    elif mesh is None:
        twin = _steps_twin(bf16_cfg, layout)
    else:  # the bf16 twin uses the same dispatchers as the model
        from dsv3_jax.expert_parallel import use_expert_parallel

        abstract = nnx.eval_shape(lambda: DeepSeekV3(bf16_cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                                                     scan_layers=layout[0], remat=layout[1]))
        use_expert_parallel(abstract, mesh)
        gd, p_abs, _ = nnx.split(abstract, nnx.Param, ...)
        twin = (gd, p_abs)
    body = _train_step_fn(twin)

    def train_step(leaves, xs, ys, hp, gamma):  # the name of its HLO module, which dsv3.bench.profile reads
        sm, so = jax.tree.unflatten(treedef, leaves)
        m, o = nnx.merge(gd_m, sm), nnx.merge(gd_o, so)
        out = body(m, o, xs, ys, hp, gamma)
        return jax.tree.leaves((nnx.state(m), nnx.state(o))), out

    if mesh is None:
        return jax.jit(train_step)
    return jax.jit(train_step, out_shardings=(list(shardings), None), donate_argnums=0)


def _train_step_fn(twin):
    """The optimizer step (not yet jitted): mutates model and optimizer, returns the metrics.
    ``hp``: the optimizer's per-step arguments, ``{"lr": ..., **_tx_args(tcfg)}`` as fp32 scalars."""

    def train_step(model, optimizer, xs, ys, hp, gamma):
        gd, params, rest = nnx.split(model, nnx.Param, ...)

        def loss_fn(p, x, y):
            out = _loss_model(gd, p, rest, twin).compute_loss(x, y)
            return out.loss, out

        def body(acc, xy):
            (_, out), g = jax.value_and_grad(loss_fn, has_aux=True)(params, *xy)
            acc = jax.tree.map(lambda a, b: a + b.astype(a.dtype), acc, g)
            return acc, out

        zeros = jax.tree.map(jnp.zeros_like, params)
        gsum, outs = jax.lax.scan(body, zeros, (xs, ys))
        k = xs.shape[0]
        grads = jax.tree.map(lambda g: g / k, gsum)
        grad_norm = optax.tree.norm(grads)
        # A non-finite loss or gradient norm applies nothing: every array of the model (parameters and
        # router biases) and of the optimizer (moments, step count) is selected back to its old value.
        ok = jnp.isfinite(jnp.mean(outs.loss)) & jnp.isfinite(grad_norm)
        old_model, old_opt = jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(optimizer))
        optimizer.update(model, grads, **hp)
        counts = jnp.sum(outs.counts, axis=0)
        model.update_router_bias(counts, gamma)  # once per optimizer step, summed counts
        for obj, old in ((model, old_model), (optimizer, old_opt)):
            new, treedef = jax.tree.flatten(nnx.state(obj))
            nnx.update(obj, jax.tree.unflatten(treedef, [jnp.where(ok, n, o) for n, o in zip(new, old)]))
        depth = jnp.mean(outs.mtp_losses) if outs.mtp_losses.shape[-1] else jnp.float32(0.0)
        return {"loss": jnp.mean(outs.loss), "main_loss": jnp.mean(outs.main_loss),
                "mtp_loss": jnp.mean(outs.mtp_loss), "balance_loss": jnp.mean(outs.balance_loss),
                "mtp_depth_loss": depth, "grad_norm": grad_norm, "counts": counts}

    return train_step


def _make_eval_step(twin):
    @nnx.jit
    def eval_step(model, x, y):
        gd, params, rest = nnx.split(model, nnx.Param, ...)
        out = _loss_model(gd, params, rest, twin).compute_loss(x, y)
        depth = jnp.mean(out.mtp_losses) if out.mtp_losses.shape[-1] else jnp.float32(0.0)
        return {"main_loss": out.main_loss, "mtp_depth_loss": depth}

    return eval_step


def make_backend(cfg: ModelConfig, tcfg: TrainConfig) -> JaxBackend:
    """The backend of a run; on the mesh ``tcfg.mesh`` ("data=2,fsdp=2,expert=2") when it names one."""
    if getattr(tcfg, "mesh", None):
        from dsv3_jax.dist_train import ShardedJaxBackend  # orbax checkpoints of the sharded state

        return ShardedJaxBackend(cfg, tcfg)
    return JaxBackend(cfg, tcfg)
