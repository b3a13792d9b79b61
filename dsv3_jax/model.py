"""DeepSeek-V3 decoder and its training loss (Paper §2, §2.2, §2.1.2; docs/reference.md §5, §6, §8), Flax NNX.

Mirror of dsv3_torch/model.py: the same module tree and attribute names (docs/API.md)

    DeepSeekV3: embed, layers[i] (Block: attn_norm, attn, ffn_norm, ffn), norm, head, mtp[k]

Layers are an ``nnx.List`` of Blocks run by a Python loop (exactly the canonical names, no
stacking). Linear kernels are Flax [in, out]; ``canonical_state`` / ``load_canonical_state``
convert to and from the torch-layout canonical flat dict with transposes only.

Scanned layers (``scan_layers=True``, opt-in): ``layers`` is None and the main decoder layers are
at most two stacked Blocks, ``dense_stack`` (the first ``first_k_dense_replace`` layers) and
``moe_stack`` (the rest), built with ``nnx.vmap`` (every variable gets a leading layer axis) and
run by ``jax.lax.scan`` (carry: h; per layer: the MoE statistics out, the KV cache slices in and
out), so the compiled program does not grow with depth. MTP modules are not scanned. Canonical
names are unchanged: ``layers.{i}.X`` is row i (or i - first_k_dense_replace) of the stack's
``X``, stacked and unstacked on the host. ``remat`` ("none" | "full" | "dots") checkpoints each
layer's activations (jax.checkpoint with nothing saved / only dots without batch dims saved),
scanned or not.

fp32 parity on GPU/TPU needs ``jax.config.update("jax_default_matmul_precision", "highest")``
(docs/reference.md §9.2.7); tests/jax and parity/ set it, the model leaves the global setting to the user.

Shape legend: B batch, T time, D model width, V vocab, E routed experts, L router layers.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from dataclasses import field as dataclass_field

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3 import checkpoint, names
from dsv3.config import ModelConfig
from dsv3.types import LossOutput
from dsv3_jax.block import Block
from dsv3_jax.layers import dense, linear, log_softmax, normal_init, to_numpy
from dsv3_jax.mla import visible_mask
from dsv3_jax.moe import COMBINES, MoE, MoEOutput, Router, sequence_balance_loss
from dsv3_jax.mtp import MTPModule
from dsv3_jax.norm import RMSNorm
from dsv3_jax.rope import RotaryEmbedding

IGNORE_INDEX = -100

# remat choice -> jax.checkpoint policy (None: no rematerialisation)
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# XLA:CPU removes optimisation barriers before its last common-subexpression elimination, so the
# recomputation jax.checkpoint adds to an unrolled layer merges back into the forward (measured with
# `.compile().memory_analysis()`, medium preset, batch 8 x 256: temporaries 2.49 GiB with remat "none",
# 2.48 GiB "full"; scanned, whose backward is another loop body, 2.56 and 0.99 GiB).
UNROLLED_REMAT_ON_CPU = ("remat on an unrolled model saves no memory on XLA:CPU (it merges the recomputation "
                         "back into the forward); use scan_layers=True (dsv3 train --scan-layers) with remat")
# One layer's cache entries and their rank unstacked (a stacked cache has one more leading axis).
_CACHE_RANK = {"c_kv": 3, "k_pe": 3, "k": 4, "v": 4}


def mask_positions(valid: jax.Array) -> jax.Array:
    """[B, T] bool real tokens -> [B, T] positions cumsum - 1, clamped at 0: each row counts only its real
    tokens, so a left-padded row has the positions of the row alone (Hugging Face's rule)."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)


def cached_keys(cache: "KVCache", new: jax.Array, start_pos) -> tuple[jax.Array, jax.Array]:
    """The cache's mask with the entries start_pos.. set to new [B,S] bool (entries written without a mask
    are real) -> (keys [B, max_len], the new entries' positions [B,S]: each row counts its real entries)."""
    B, L = new.shape[0], cache.max_len
    keys = jnp.ones((B, L), bool) if cache.mask is None else cache.mask
    keys = jax.lax.dynamic_update_slice_in_dim(keys, new, start_pos, axis=1)
    before = jnp.sum(keys & (jnp.arange(L) < start_pos), axis=1)  # [B] real entries before
    return keys, jnp.maximum(before[:, None] + jnp.cumsum(new.astype(jnp.int32), axis=1) - 1, 0)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean next-token CE in fp32 over labels != -100 (0 when there are none)."""
    lp = log_softmax(logits.astype(jnp.float32))
    valid = labels != IGNORE_INDEX
    nll = -jnp.take_along_axis(lp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    n = jnp.sum(valid)
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(n, 1).astype(jnp.float32)


@jax.tree_util.register_dataclass
@dataclass
class KVCache:
    """Decoding cache, a pytree (kind and max_len static): per layer a dict of [B, max_len, ...] arrays,
    replaced functionally by each cached call (jax arrays are immutable; dsv3_torch fills in place).

    latent: c_kv [B, max_len, C] (normalised) and k_pe [B, max_len, R] (rotated);
    naive:  k [B, max_len, H, N+R] and v [B, max_len, H, V].
    mask: None until a cached call gets an attention_mask; then [B, max_len] bool, True where
    the entry is a real token (entries written without a mask are real), so the later calls
    keep hiding the padded keys and count each row's positions over its real tokens only.
    """

    kind: str = dataclass_field(metadata=dict(static=True))
    max_len: int = dataclass_field(metadata=dict(static=True))
    layers: list = dataclass_field(default_factory=list)
    mask: jax.Array | None = None

    @property
    def batch(self) -> int:
        """B; a scanned model's cache holds one dict per layer stack, each array with a leading layer axis."""
        key, x = next(iter(self.layers[0].items()))
        return x.shape[x.ndim - _CACHE_RANK[key]]


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


class DeepSeekV3(nnx.Module):
    """DeepSeek-V3 (MLA + DeepSeekMoE + MTP). ``model(tokens [B,T] int) -> logits [B,T,V]`` (model dtype).

    moe_impl: "auto" | "loop" | "blocksparse" | "ragged" (grouped expert matmul, see moe.py);
    combine: "grouped" | "eager" (routed-output accumulation, docs/reference.md §4.5);
    scan_layers: hold the main layers as two stacked Blocks run by a scan (``dense_stack``,
    ``moe_stack``; ``layers`` is then None; module docstring); remat: "none" | "full" | "dots".
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs | None = None, dtype=jnp.float32, *,
                 moe_impl: str = "auto", combine: str = "grouped", scan_layers: bool = False,
                 remat: str = "none", _blocks: bool = True):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {remat!r}")
        if remat != "none" and not scan_layers and jax.default_backend() == "cpu":
            warnings.warn(UNROLLED_REMAT_ON_CPU, stacklevel=2)
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.cfg = cfg
        self.dtype = dtype
        self.scan_layers, self.remat = bool(scan_layers), remat
        D, V = cfg.hidden_size, cfg.vocab_size
        kw = dict(dtype=dtype, moe_impl=moe_impl, combine=combine, rngs=rngs)
        self.embed = nnx.Embed(V, D, dtype=dtype, param_dtype=dtype,
                               embedding_init=normal_init(cfg.initializer_range), rngs=rngs)
        self.rope = RotaryEmbedding(cfg)
        n_layers, n_mtp = (cfg.num_hidden_layers, cfg.num_nextn_predict_layers) if _blocks else (0, 0)
        if self.scan_layers:  # built even for `abstract` (_blocks=False): one vmapped trace per stack
            n_dense = min(cfg.first_k_dense_replace, cfg.num_hidden_layers)
            self.layers = None
            self.dense_stack = _stacked_block(cfg, False, n_dense, kw)
            self.moe_stack = _stacked_block(cfg, True, cfg.num_hidden_layers - n_dense, kw)
        else:
            self.layers = nnx.List([Block(cfg, cfg.is_moe_layer(i), **kw) for i in range(n_layers)])
        self.norm = RMSNorm(D, cfg.rms_norm_eps, dtype=dtype)
        self.head = linear(D, V, cfg, dtype, rngs)
        self.mtp = nnx.List([MTPModule(cfg, **kw) for _ in range(n_mtp)])

    @classmethod
    def abstract(cls, cfg: ModelConfig, dtype=jnp.float32, **kwargs) -> "DeepSeekV3":
        """The model with ShapeDtypeStruct leaves, allocating nothing (nnx.eval_shape, docs/reference.md §10).

        Each block is traced on its own: one trace of the whole model grows quadratically with
        depth in flax 0.12 (every Rngs update searches the jaxpr; figures in docs/bench/README.md).
        Only one dense and one MoE layer are traced; the other layers are copies of them (an
        abstract block holds shapes only, so copies equal traces: V3's 61 layers take 2 traces).
        """
        model = nnx.eval_shape(lambda: cls(cfg, nnx.Rngs(0), dtype, _blocks=False, **kwargs))
        kwargs.pop("scan_layers", None)
        kwargs.pop("remat", None)
        kw = dict(dtype=dtype, **kwargs)
        traced: dict = {}

        def layer(i):
            moe = cfg.is_moe_layer(i)
            if moe in traced:
                return nnx.clone(traced[moe])
            traced[moe] = nnx.eval_shape(lambda: Block(cfg, moe, rngs=nnx.Rngs(i), **kw))
            return traced[moe]

        if not model.scan_layers:
            model.layers = nnx.List([layer(i) for i in range(cfg.num_hidden_layers)])
        model.mtp = nnx.List([nnx.eval_shape(lambda k=k: MTPModule(cfg, rngs=nnx.Rngs(k), **kw))
                              for k in range(cfg.num_nextn_predict_layers)])
        return model

    # ------------------------------------------------------------ validation
    def _check_tokens(self, tokens, start_pos=0, cache_len=None) -> None:
        """Eager checks on concrete inputs (skipped under tracing)."""
        if _is_traced(tokens):
            return
        t = np.asarray(tokens)
        if t.ndim != 2:
            raise ValueError(f"tokens must be [B, T], got shape {t.shape}")
        if not np.issubdtype(t.dtype, np.integer):
            raise ValueError(f"tokens must be integer ids, got dtype {t.dtype}")
        V = self.cfg.vocab_size
        if t.size and (t.min() < 0 or t.max() >= V):
            bad = t[(t < 0) | (t >= V)]
            raise ValueError(f"token ids must lie in [0, {V}); got {bad[:5].tolist()}")
        end = t.shape[1] + (0 if _is_traced(start_pos) else int(start_pos))
        if end > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence length {end} exceeds max_position_embeddings="
                             f"{self.cfg.max_position_embeddings}")
        if cache_len is not None and end > cache_len:
            raise ValueError(f"positions up to {end} do not fit the cache of length {cache_len}")

    # --------------------------------------------------------------- forward
    def _trunk(self, tokens, start_pos=0, caches=None, positions=None, mask=None, valid=None):
        """Embedding and decoder layers: -> (h [B,T,D] before norm, MoEOutputs, (cos, sin), caches).

        positions: None (start_pos + arange(T)) or [B,T] per-row positions; mask, valid: padding
        (``visible_mask`` [B,1,T,keys] and the real tokens [B,T]), None without. The MoEOutputs
        are one per MoE layer, or with scan_layers one for the MoE stack with a leading layer
        axis on every field (``_unstack_stats`` splits it); caches: one per layer or per stack."""
        T = tokens.shape[1]
        h = self.embed(tokens.astype(jnp.int32))
        if positions is None:  # static positions from a Python start: tables computed once (RotaryEmbedding)
            static = isinstance(start_pos, (int, np.integer))
            positions = np.arange(start_pos, start_pos + T) if static else start_pos + jnp.arange(T)
        cos, sin = self.rope(positions, self.dtype)
        args = (cos, sin, start_pos, mask, valid)
        # unrolled: one Block per layer; scanned: one lax.scan per layer stack (same outputs, stacked)
        run, units = (_scan_stack, self._stacks()) if self.scan_layers else (_call_block, self.layers)
        stats, new_caches = [], []
        for i, unit in enumerate(units):
            h, st, c = run(unit, h, None if caches is None else caches[i], args, self.remat)
            if st is not None:
                stats.append(st)  # MoEOutput
            new_caches.append(c)
        return h, stats, (cos, sin), (None if caches is None else new_caches)

    def _stacks(self) -> list[Block]:
        """The non-empty layer stacks of a scanned model, in layer order (dense, then MoE)."""
        return [s for s in (self.dense_stack, self.moe_stack) if s is not None]

    def _unstack_stats(self, stats) -> list[MoEOutput]:
        """The MoEOutputs of ``_trunk`` -> one per MoE layer."""
        if not self.scan_layers:
            return list(stats)
        return [jax.tree.map(lambda x, i=i: x[i], o) for o in stats for i in range(o.counts.shape[0])]

    def __call__(self, tokens, attention_mask=None) -> jax.Array:
        """tokens [B, T] int -> main-head logits [B, T, V] (model dtype); eager calls run one jitted program.

        attention_mask: None or [B, T] (1 = real token, 0 = padding; Hugging Face's convention):
        padded keys are never attended to and each row's positions count its real tokens only,
        so a left- or right-padded row gives the logits of the row alone at its real positions."""
        self._check_tokens(tokens)
        self._check_mask(attention_mask, tokens)
        if _is_traced(tokens):
            return self.logits(tokens, attention_mask)
        am = None if attention_mask is None else jnp.asarray(attention_mask)
        return _jit_logits(self, jnp.asarray(tokens), am)

    def logits(self, tokens, attention_mask=None):
        """Traceable forward without input checks: tokens [B,T] -> logits [B,T,V]."""
        h, _ = self.hidden(tokens, attention_mask)
        logits = dense(self.head, h)
        chex.assert_shape(logits, (*jnp.shape(tokens), self.cfg.vocab_size))
        return logits

    def _check_mask(self, attention_mask, tokens) -> None:
        if attention_mask is not None and tuple(jnp.shape(attention_mask)) != tuple(jnp.shape(tokens)):
            raise ValueError(f"attention_mask {tuple(jnp.shape(attention_mask))} must match the tokens "
                             f"{tuple(jnp.shape(tokens))}")

    def _inputs(self, tokens, attention_mask):
        """-> (positions, mask, valid) of a full (uncached) forward; all None without padding."""
        if attention_mask is None:
            return None, None, None
        self._check_mask(attention_mask, tokens)
        valid = jnp.asarray(attention_mask).astype(bool)
        return mask_positions(valid), visible_mask(valid, 0, valid.shape[1]), valid

    def hidden(self, tokens, attention_mask=None) -> tuple[jax.Array, list[MoEOutput]]:
        """tokens [B, T] -> (hidden AFTER the final norm [B, T, D], MoEOutput per main MoE layer); bias untouched.

        With an attention_mask the MoEOutputs' counts cover the real tokens only."""
        chex.assert_rank(tokens, 2)
        positions, mask, valid = self._inputs(tokens, attention_mask)
        h, stats, _, _ = self._trunk(tokens, positions=positions, mask=mask, valid=valid)
        chex.assert_shape(h, (*jnp.shape(tokens), self.cfg.hidden_size))
        return self.norm(h), self._unstack_stats(stats)

    def _stack_counts(self, stats):
        """MoEOutputs (single, or stacked with a leading layer axis) -> counts [n, E] in order."""
        if not stats:
            return jnp.zeros((0, self.cfg.n_routed_experts), jnp.int32)
        return jnp.concatenate([o.counts.reshape(-1, self.cfg.n_routed_experts) for o in stats])

    # ------------------------------------------------------------------ loss
    def compute_loss(self, input_ids, labels, attention_mask=None) -> LossOutput:
        """Main CE + (lambda/D) sum_k MTP CE_k + alpha sum_routers L_Bal (docs/reference.md §6, §8.2).

        labels[b, i] is the target of position i (-100 ignored). Depth k embeds roll(input_ids, -k)
        (tail 0) and predicts roll(labels, -k) with the last k masked. Nothing changes the bias.
        attention_mask [B, T] (1 = real, 0 = padding): labels at padded positions are ignored,
        depth k embeds token 0 where t_{i+k} is padding (as past the end), and padded tokens
        are left out of the counts and the balance loss: a padded batch scores as its rows alone.
        """
        self._check_tokens(input_ids)
        cfg = self.cfg
        input_ids = jnp.asarray(input_ids).astype(jnp.int32)
        labels = jnp.asarray(labels).astype(jnp.int32)
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}")
        T = input_ids.shape[1]
        positions, mask, valid = self._inputs(input_ids, attention_mask)
        if valid is not None:
            labels = jnp.where(valid, labels, IGNORE_INDEX)
        h, stats, (cos, sin), _ = self._trunk(input_ids, positions=positions, mask=mask, valid=valid)
        h = self.norm(h)  # h^0: the main hidden after the final norm (docs/reference.md §6)
        main = cross_entropy(dense(self.head, h), labels)
        mtp_losses = []
        for k, module in enumerate(self.mtp, start=1):
            tail = jnp.arange(T) >= T - k
            ids_k = jnp.where(tail, 0, jnp.roll(input_ids, -k, axis=1))
            lab_k = jnp.where(tail, IGNORE_INDEX, jnp.roll(labels, -k, axis=1))
            if valid is not None:  # t_{i+k} padding: token 0, as past the end; a padded i never scores
                ids_k = jnp.where(tail | ~jnp.roll(valid, -k, axis=1), 0, ids_k)
                lab_k = jnp.where(valid, lab_k, IGNORE_INDEX)
            h, st = module(h, self.embed(ids_k), cos, sin, mask, valid)
            mtp_losses.append(cross_entropy(dense(self.head, module.norm(h)), lab_k))
            stats.append(st)
        n_mtp = len(self.mtp)  # MTP depths (the Paper's D; D is the model width here)
        mtp_losses = jnp.stack(mtp_losses) if mtp_losses else jnp.zeros((0,), jnp.float32)
        mtp_loss = cfg.mtp_loss_weight / n_mtp * jnp.sum(mtp_losses) if n_mtp else jnp.float32(0.0)
        K = cfg.num_experts_per_tok
        bal = sum((_balance_loss(o.scores, K, valid) for o in stats), jnp.float32(0.0)) * jnp.float32(
            cfg.balance_loss_alpha)
        loss = main + mtp_loss + bal
        counts = self._stack_counts(stats)
        chex.assert_rank([loss, main, mtp_loss, bal], 0)
        chex.assert_shape(mtp_losses, (n_mtp,))
        chex.assert_shape(counts, (cfg.n_router_layers, cfg.n_routed_experts))
        return LossOutput(loss=loss, main_loss=main, mtp_losses=mtp_losses, mtp_loss=mtp_loss,
                          balance_loss=bal, counts=counts)

    # ----------------------------------------------------------- router bias
    def routers(self) -> list[Router]:
        """Every router in counts order: main MoE layers, then MTP depths. With scan_layers the first
        is the MoE stack's router, whose bias [L_moe, E] takes L_moe rows of the counts."""
        return [moe.gate for moe in self.moe_layers()]

    def moe_layers(self) -> list[MoE]:
        """Every MoE in counts order: main MoE layers, then MTP depths (scan_layers: the MoE stack,
        one module whose variables have a leading layer axis, stands for its layers)."""
        main = self._stacks() if self.scan_layers else list(self.layers)
        blocks = main + [m.block for m in self.mtp]
        return [b.ffn for b in blocks if b.moe]

    def set_moe_combine(self, scheme: str) -> None:
        """'grouped' (default) or 'eager' (bit parity with HF eager experts in bf16)."""
        if scheme not in COMBINES:
            raise ValueError(f"combine scheme must be one of {COMBINES}, got {scheme!r}")
        for moe in self.moe_layers():
            moe.dispatcher.scheme = scheme

    def update_router_bias(self, counts, gamma=None) -> None:
        """b += gamma * sign(mean(c) - c) for every router (docs/reference.md §8.1). counts [n_router_layers, E].

        In place; works inside nnx.jit. gamma defaults to cfg.bias_update_speed."""
        gamma = self.cfg.bias_update_speed if gamma is None else gamma
        c = jnp.asarray(counts).astype(jnp.float32)
        routers = self.routers()
        rows = [r.bias[...].shape[0] if r.bias[...].ndim == 2 else 1 for r in routers]
        if c.shape != (sum(rows), self.cfg.n_routed_experts):
            raise ValueError(f"counts must be [{sum(rows)}, {self.cfg.n_routed_experts}], got {c.shape}")
        delta = jnp.asarray(gamma, jnp.float32) * jnp.sign(jnp.mean(c, axis=-1, keepdims=True) - c)
        start = 0
        for r, n in zip(routers, rows):
            d = delta[start:start + n] if r.bias[...].ndim == 2 else delta[start]
            r.bias[...] = r.bias[...] + d
            start += n

    # -------------------------------------------------------------- decoding
    def init_cache(self, batch: int, max_len: int, kind: str = "latent") -> KVCache:
        """An empty KVCache: per layer latent {c_kv [B,L,C], k_pe [B,L,R]} or naive {k [B,L,H,N+R], v [B,L,H,V]}."""
        if max_len > self.cfg.max_position_embeddings:
            raise ValueError(f"max_len {max_len} exceeds max_position_embeddings={self.cfg.max_position_embeddings}")
        if self.scan_layers:  # one dict per stack, each array [L_stack, B, max_len, ...]
            return KVCache(kind, max_len, [
                jax.tree.map(lambda x, n=s.ffn_norm.weight.shape[0]: jnp.zeros((n, *x.shape), x.dtype),
                             s.attn.init_cache(batch, max_len, kind)) for s in self._stacks()])
        return KVCache(kind, max_len, [layer.attn.init_cache(batch, max_len, kind) for layer in self.layers])

    def hidden_cached(self, tokens, cache: KVCache, start_pos, attention_mask=None):
        """tokens [B,S] at cache entries start_pos.. -> (hidden AFTER the final norm [B,S,D], updated cache).

        The h^0 an MTP depth takes (speculative decoding). start_pos may be traced. attention_mask:
        None or [B, S] for the new tokens only (1 = real, 0 = padding), kept in ``cache.mask`` so that
        every later call hides the padded entries and gives each row the positions of its real
        tokens; a call without one on such a cache feeds real tokens. Static shapes: the mask
        is an array, never a Python branch on values."""
        self._check_tokens(tokens, start_pos, cache_len=cache.max_len)
        self._check_mask(attention_mask, tokens)
        tokens = jnp.asarray(tokens)
        if attention_mask is None and cache.mask is None:
            h, _, _, layers = self._trunk(tokens, start_pos, cache.layers)
            return self.norm(h), KVCache(cache.kind, cache.max_len, layers)
        B, S = tokens.shape
        new = jnp.ones((B, S), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        keys, positions = cached_keys(cache, new, start_pos)
        h, _, _, layers = self._trunk(tokens, start_pos, cache.layers, positions,
                                      visible_mask(keys, start_pos, S), new)
        return self.norm(h), KVCache(cache.kind, cache.max_len, layers, keys)

    def forward_cached(self, tokens, cache: KVCache, start_pos, attention_mask=None):
        """tokens [B,S] at cache entries start_pos.. -> (logits [B,S,V], updated cache). start_pos may be traced.

        attention_mask: as in hidden_cached."""
        h, cache = self.hidden_cached(tokens, cache, start_pos, attention_mask)
        logits = dense(self.head, h)
        chex.assert_shape(logits, (*jnp.shape(tokens), self.cfg.vocab_size))
        return logits, cache

    # ------------------------------------------------------ canonical state
    def _slots(self) -> list[tuple[str, nnx.Variable, str, int | None]]:
        """(canonical name, variable, layout, row) in the order of dsv3.checkpoint's table, derived from
        the module paths by one rule: the path joined by "."; a Linear's ``kernel`` and the Embed's
        ``embedding`` are the canonical ``weight`` (layout "T": 2-D transpose, "id" for the embedding);
        the stacked experts' 3-D w1/w2/w3 swap their last two axes ("E"); everything else as is ("id").
        row: None, or for a layer stack's variable (scan_layers) the layer's row of its leading axis:
        ``dense_stack.X`` row j is ``layers.{j}.X``, ``moe_stack.X`` row j ``layers.{k + j}.X``
        (k = first_k_dense_replace). Layouts apply to one row."""
        found = {}
        offsets = {"dense_stack": 0, "moe_stack": min(self.cfg.first_k_dense_replace, self.cfg.num_hidden_layers)}
        for path, node in nnx.iter_graph(self):
            if not isinstance(node, nnx.Variable):
                continue
            *head, leaf = (str(p) for p in path)
            if leaf == "kernel":
                rest, lay = head + ["weight"], "T"
            elif leaf == "embedding":
                rest, lay = head + ["weight"], "id"
            elif head[-1:] == ["experts"]:
                rest, lay = head + [leaf], "E"
            else:
                rest, lay = head + [leaf], "id"
            if head and head[0] in offsets:
                for j in range(node.get_value().shape[0]):
                    found[".".join(["layers", str(offsets[head[0]] + j)] + rest[1:])] = (node, lay, j)
            else:
                found[".".join(rest)] = (node, lay, None)
        order = list(names.canonical_shapes(self.cfg))
        if set(found) != set(order):
            raise names.CheckpointError(f"module paths do not map onto the canonical names: "
                                        f"{sorted(set(found) ^ set(order))[:10]}")
        return [(n, *found[n]) for n in order]

    def canonical_state(self, fetch=to_numpy) -> dict[str, np.ndarray]:
        """{canonical name: numpy array} in torch layout ([out, in]; experts [E, out, in]).

        fetch: a variable's value -> its whole array on the host (a multi-process run passes a gather);
        the layout change is a host transpose, a stacked layer a host slice (nothing is compiled)."""
        host: dict[int, np.ndarray] = {}

        def value(var, row):
            if id(var) not in host:
                host[id(var)] = fetch(var.get_value())
            return host[id(var)] if row is None else host[id(var)][row]

        return {name: np.ascontiguousarray(_from_torch(value(var, row), lay))
                for name, var, lay, row in self._slots()}

    def load_canonical_state(self, state) -> None:
        """Fill every variable from a torch-layout canonical dict (validated with check_state);
        a layer stack's rows are stacked on the host and set once."""
        names.check_state(state, self.cfg)
        stacked: dict[int, tuple[nnx.Variable, dict]] = {}
        for name, var, lay, row in self._slots():
            x = _from_torch(np.asarray(state[name]), lay)
            if row is None:
                var.set_value(jnp.asarray(x, dtype=var.get_value().dtype))
            else:
                stacked.setdefault(id(var), (var, {}))[1][row] = x
        for var, rows in stacked.values():
            var.set_value(jnp.asarray(np.stack([rows[j] for j in range(len(rows))]), dtype=var.get_value().dtype))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, dtype=jnp.float32, **kwargs) -> "DeepSeekV3":
        """Load a HF-layout checkpoint: build abstractly (nnx.eval_shape), then fill (docs/reference.md §10)."""
        cfg, state = checkpoint.load_canonical(os.fspath(directory))
        model = cls.abstract(cfg, dtype, **kwargs)
        model.load_canonical_state(state)
        left = [p for p, v in nnx.to_flat_state(nnx.state(model)) if not isinstance(v.get_value(), jax.Array)]
        if left:
            raise names.CheckpointError(f"variables not filled from the checkpoint: {left[:10]}")
        return model

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """config.json + safetensors with HF names (atomic writes, dsv3.checkpoint.save_canonical)."""
        checkpoint.save_canonical(os.fspath(directory), self.canonical_state(), self.cfg)

    def num_params(self) -> int:
        """Parameters counted once (nnx.Param; router biases excluded: they are not parameters)."""
        return sum(int(np.prod(v.get_value().shape[0 if row is None else 1:]))
                   for _, v, _, row in self._slots() if isinstance(v, nnx.Param))


def _stacked_block(cfg: ModelConfig, moe: bool, n: int, kw: dict) -> Block | None:
    """n Blocks as one, every variable with a leading layer axis (nnx.vmap, one rng split per layer); None if n == 0."""
    if n == 0:
        return None
    rest = {k: v for k, v in kw.items() if k != "rngs"}

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(rngs):
        return Block(cfg, moe, rngs=rngs, **rest)

    return make(kw["rngs"])


def _call_block(block: Block, h, cache, args, remat: str):
    """One Block on h (args: cos, sin, start_pos, mask, valid); remat != "none": jax.checkpoint around it."""
    cos, sin, start_pos, mask, valid = args
    policy = REMAT_POLICIES[remat]
    if policy is None:
        return block(h, cos, sin, start_pos, cache, mask, valid)
    gd, st = nnx.split(block)

    def run(st, h, cache, cos, sin, start_pos, mask, valid):
        return nnx.merge(gd, st)(h, cos, sin, start_pos, cache, mask, valid)

    return jax.checkpoint(run, policy=policy)(st, h, cache, cos, sin, start_pos, mask, valid)


def _scan_stack(stack: Block, h, cache, args, remat: str):
    """A layer stack over h by jax.lax.scan: -> (h, MoEOutput with a leading layer axis or None, cache).

    The stack's state is the scanned input (one layer's variables per step); cache (a dict of
    [L, B, max_len, ...]) goes in and comes out per layer; h is the carry."""
    gd, st = nnx.split(stack)
    policy = REMAT_POLICIES[remat]

    def body(h, xs):
        layer_state, layer_cache = xs
        h, out, c = nnx.merge(gd, layer_state)(h, *args[:3], layer_cache, *args[3:])
        return h, (out, c)

    if policy is not None:
        body = jax.checkpoint(body, policy=policy)
    h, (outs, caches) = jax.lax.scan(body, h, (st, cache))
    return h, outs, caches


def _balance_loss(scores, K: int, valid) -> jax.Array:
    """sequence_balance_loss of one MoE layer's scores [B,T,E], summed over a stack's layers for [L,B,T,E]."""
    if scores.ndim == 4:
        return jnp.sum(jax.vmap(lambda s: sequence_balance_loss(s, K, valid))(scores))
    return sequence_balance_loss(scores, K, valid)


def _from_torch(x: np.ndarray, layout: str) -> np.ndarray:
    """torch layout <-> ours: "T" a 2-D transpose, "E" the experts' last two axes swapped (its own inverse)."""
    if layout == "T":
        return x.T
    if layout == "E":
        return np.swapaxes(x, -1, -2)
    return x


@nnx.jit
def _jit_logits(model: DeepSeekV3, tokens: jax.Array, attention_mask=None) -> jax.Array:
    return model.logits(tokens, attention_mask)
