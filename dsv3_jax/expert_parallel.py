"""Expert parallelism behind the MoE's dispatch seam: ``ExpertParallelDispatcher`` (Paper §3.2; docs/reference.md §11).

Replaces ``dsv3_jax.moe.LocalDispatcher`` on a mesh whose ``expert`` axis has S > 1 shards; the
router, the experts' maths (the grouped SwiGLU of ``dsv3_jax.moe``) and the model code are unchanged.
Routed experts are split by expert id over ``expert`` (El = E/S per shard, ``sharding.RULES``), tokens
over every axis. Each step runs in ``jax.shard_map`` over the whole mesh, per device:

  dispatch  all_gather the local tokens x [n, D] and expert ids [n, K] over ``expert`` -> the
            expert group's n*S tokens; sort their (token, slot) pairs so the pairs of this shard's
            El experts come first, grouped by expert (stable: by token within an expert);
  compute   the grouped SwiGLU on those rows with this shard's El experts (the module's own
            expert loop / block-sparse / ragged_dot paths);
  combine   each pair's output times its routing weight, summed over the slots of this shard's
            experts in slot order (fp32), then ``psum_scatter`` over ``expert``: every token
            receives the sum of its K slots from the shards that hold them, in its own shard.

Dropless: no capacity factor, no token dropped, the routing is the single-device routing (it is
computed before the exchange, on the global batch). The static row bound per device is every
gathered pair, n*S*K -- the worst case of all of the group's pairs landing on one shard -- so a
skewed batch never overflows; on CPU the expert loop computes only this shard's rows (the block-sparse
matmul runs over that bound).
The expert counts for the bias update are the global ``bincount`` of the routing, computed outside
the ``shard_map`` on the global batch, so every shard applies the same update.

Collectives per MoE layer and step (forward; the backward moves the same again, transposed):
all_gather of x (n*S*D values) and of the ids and weights (2*n*S*K), psum_scatter of n*S*D fp32
partial outputs. This is MaxText's "ring of experts"; XLA:CPU has these collectives and has no
``ragged-all-to-all``. An all-to-all of only the routed rows (``jax.lax.ragged_all_to_all``) moves
n*K*D instead of ~2*n*S*D, which wins when K < 2S; it is not built here (see docs/scaling.md).

Shape legend: N tokens (global), n tokens per device, S expert shards, E experts, El = E/S,
K experts per token, D model width, G = n*S*K gathered pairs per device.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from dsv3.types import Routing
from dsv3_jax.moe import (_blocksparse_swiglu, _loop_swiglu, _ragged_swiglu, default_block_rows, default_chunk_rows,
                         stable_argsort)

TOKENS = ("data", "fsdp", "expert")  # tokens split over every axis (dsv3_jax.sharding.BATCH_AXES)


class EPPlan(NamedTuple):
    order: jax.Array   # [G] per device: gathered (token, slot) pair of each sorted row
    local: jax.Array   # [G] per device: the sorted row belongs to one of this shard's experts
    counts: jax.Array  # [E] int32 global assignments per expert (the bias update's counts)


class ExpertParallelDispatcher(nnx.Module):
    """Dispatch / compute / combine across the ``expert`` axis of ``mesh`` (see the module docstring).

    Same interface as LocalDispatcher, plus ``compute(experts, x_sorted, group_sizes)``. Its arrays
    between the steps are per-device blocks laid end to end (global [devices * G, ...])."""

    def __init__(self, n_experts: int, top_k: int, mesh: jax.sharding.Mesh, scheme: str = "grouped"):
        S = int(mesh.shape["expert"])
        if n_experts % S:
            raise ValueError(f"{n_experts} routed experts do not split over expert={S} shards")
        if scheme != "grouped":
            raise ValueError(f"expert parallelism combines in fp32 ('grouped'); got combine scheme {scheme!r}")
        self.n_experts, self.top_k, self.mesh, self.scheme = n_experts, top_k, mesh, scheme

    def _smap(self, f, in_specs, out_specs):
        return jax.shard_map(f, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs)

    def dispatch(self, x: jax.Array, routing: Routing):
        """x [N, D] -> (x_sorted [devices*G, D], group_sizes [devices*El], EPPlan)."""
        E, K = self.n_experts, self.top_k
        El = E // int(self.mesh.shape["expert"])

        def local(x, idx):
            X = jax.lax.all_gather(x, "expert", tiled=True)             # [n*S, D]
            I = jax.lax.all_gather(idx, "expert", tiled=True)           # [n*S, K]
            le = (I - jax.lax.axis_index("expert") * El).reshape(-1)    # [G] local expert id
            mine = (le >= 0) & (le < El)
            key = jnp.where(mine, le, El)                               # other shards' pairs last
            order = stable_argsort(key, El + 1)
            sizes = jnp.bincount(key, length=El + 1)[:El].astype(jnp.int32)
            return X[order // K], sizes, order, mine[order]

        t = P(TOKENS)
        xs, sizes, order, mine = self._smap(local, (t, t), (t, t, t, t))(x, routing.indices)
        counts = jnp.bincount(routing.indices.reshape(-1), length=E).astype(jnp.int32)
        return xs, sizes, EPPlan(order, mine, counts)

    def compute(self, experts, x_sorted: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """The grouped SwiGLU of each shard's rows with its own El experts -> y_sorted [devices*G, D]."""
        impl = experts.resolved_impl()

        def local(xs, sizes, w1, w2, w3):
            G, El = xs.shape[0], w1.shape[0]
            if impl == "ragged":  # rows past sum(sizes) (other shards' pairs) belong to no group
                return _ragged_swiglu(xs, sizes, w1, w2, w3)
            if impl == "loop":  # the same: the loop computes the local experts' rows only (G/E each, balanced)
                return _loop_swiglu(xs, sizes, w1, w2, w3, default_chunk_rows(G, self.n_experts))
            # block-sparse needs every row in a group: other shards' rows ride with the last local
            # expert (computed, then masked out by combine; they get no gradient).
            sizes = sizes.at[El - 1].add(G - jnp.sum(sizes))
            yb, pos = _blocksparse_swiglu(xs, sizes, w1, w2, w3, default_block_rows(G, El))
            return yb[pos]

        t, e = P(TOKENS), P("expert")
        return self._smap(local, (t, t, e, e, e), t)(x_sorted, group_sizes, experts.w1[...], experts.w2[...],
                                                     experts.w3[...])

    def combine(self, y_sorted: jax.Array, plan: EPPlan, routing: Routing) -> jax.Array:
        """y_sorted -> y [N, D]: this shard's slots weighted and summed in slot order (fp32), then
        psum_scatter over ``expert`` back to each token's own device (model dtype)."""
        if self.scheme != "grouped":  # e.g. set_moe_combine("eager") after the switch
            raise ValueError(f"expert parallelism combines in fp32 ('grouped'); got combine scheme {self.scheme!r}")
        K = self.top_k

        def local(ys, order, mine, w):
            W = jax.lax.all_gather(w, "expert", tiled=True)             # [n*S, K]
            G, D = ys.shape
            inv = jnp.zeros_like(order).at[order].set(jnp.arange(G, dtype=order.dtype))
            y = jnp.where(mine[:, None], ys, 0)[inv].reshape(G // K, K, D)  # (token, slot) order
            acc = y[:, 0].astype(jnp.float32) * W[:, 0, None]
            for k in range(1, K):
                acc = acc + y[:, k].astype(jnp.float32) * W[:, k, None]
            return jax.lax.psum_scatter(acc, "expert", scatter_dimension=0, tiled=True).astype(ys.dtype)

        t = P(TOKENS)
        return self._smap(local, (t, t, t, t), t)(y_sorted, plan.order, plan.local, routing.weights)


def use_expert_parallel(model, mesh: jax.sharding.Mesh) -> int:
    """Give every MoE of ``model`` an ExpertParallelDispatcher on ``mesh`` (when its expert axis has
    more than one shard); returns how many MoE layers were switched. On a mesh of several devices
    without one, the local dispatchers are marked as partitioned by GSPMD (``LocalDispatcher.gspmd``)."""
    if int(mesh.shape.get("expert", 1)) <= 1:
        for moe in model.moe_layers():
            moe.dispatcher.gspmd = mesh.devices.size > 1
        return 0
    n = 0
    for moe in model.moe_layers():
        d = moe.dispatcher
        moe.dispatcher = ExpertParallelDispatcher(d.n_experts, d.top_k, mesh, d.scheme)
        n += 1
    return n
