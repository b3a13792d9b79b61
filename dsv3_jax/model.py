"""DeepSeek-V3 decoder and its training loss (Paper §2, §2.2, §2.1.2; REFERENCE §5, §6, §8), Flax NNX.

Mirror of dsv3_torch/model.py: the same module tree and attribute names (docs/API.md)

    DeepSeekV3: embed, layers[i] (Block: attn_norm, attn, ffn_norm, ffn), norm, head, mtp[k]

Layers are an ``nnx.List`` of Blocks run by a Python loop (exactly the canonical names, no
stacking). Linear kernels are Flax [in, out]; ``canonical_state`` / ``load_canonical_state``
convert to and from the torch-layout canonical flat dict with transposes only.

fp32 parity on GPU/TPU needs ``jax.config.update("jax_default_matmul_precision", "highest")``
(REFERENCE §9.2.7); tests/jax and parity/ set it, the model leaves the global setting to the user.

Shape legend: B batch, T time, D model width, V vocab, E routed experts, L router layers.
"""

from __future__ import annotations

import os
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3 import checkpoint
from dsv3.config import ModelConfig
from dsv3.types import LossOutput
from dsv3_jax.mla import MLA, dense, linear
from dsv3_jax.moe import sequence_balance_loss
from dsv3_jax.mtp import Block, MTPModule
from dsv3_jax.norm import RMSNorm, normal_init
from dsv3_jax.rope import RotaryEmbedding

IGNORE_INDEX = -100


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean next-token CE in fp32 over labels != -100 (0 when there are none)."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    valid = labels != IGNORE_INDEX
    nll = -jnp.take_along_axis(lp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    n = jnp.sum(valid)
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(n, 1).astype(jnp.float32)


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


class DeepSeekV3(nnx.Module):
    """DeepSeek-V3 (MLA + DeepSeekMoE + MTP). ``model(tokens [B,T] int) -> logits [B,T,V]`` (model dtype).

    moe_impl: "auto" | "blocksparse" | "ragged" (grouped expert matmul, see moe.py);
    combine: "grouped" | "eager" (routed-output accumulation, REFERENCE §4.5).
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs | None = None, dtype=jnp.float32, *,
                 moe_impl: str = "auto", combine: str = "grouped", _blocks: bool = True):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.cfg = cfg
        self.dtype = dtype
        D, V = cfg.hidden_size, cfg.vocab_size
        kw = dict(dtype=dtype, moe_impl=moe_impl, combine=combine, rngs=rngs)
        self.embed = nnx.Embed(V, D, dtype=dtype, param_dtype=dtype,
                               embedding_init=normal_init(cfg.initializer_range), rngs=rngs)
        self.rope = RotaryEmbedding(cfg)
        n_layers, n_mtp = (cfg.num_hidden_layers, cfg.num_nextn_predict_layers) if _blocks else (0, 0)
        self.layers = nnx.List([Block(cfg, cfg.is_moe_layer(i), **kw) for i in range(n_layers)])
        self.norm = RMSNorm(D, cfg.rms_norm_eps, dtype=dtype)
        self.head = linear(D, V, cfg, dtype, rngs)
        self.mtp = nnx.List([MTPModule(cfg, **kw) for _ in range(n_mtp)])

    @classmethod
    def abstract(cls, cfg: ModelConfig, dtype=jnp.float32, **kwargs) -> "DeepSeekV3":
        """The model with ShapeDtypeStruct leaves, allocating nothing (nnx.eval_shape, REFERENCE §10).

        Each block is traced on its own: one trace of the whole model grows quadratically with
        depth in flax 0.12 (every Rngs update searches the jaxpr), 20+ s for v3-671b.
        """
        model = nnx.eval_shape(lambda: cls(cfg, nnx.Rngs(0), dtype, _blocks=False, **kwargs))
        kw = dict(dtype=dtype, **kwargs)
        model.layers = nnx.List([nnx.eval_shape(lambda i=i: Block(cfg, cfg.is_moe_layer(i), rngs=nnx.Rngs(i), **kw))
                                 for i in range(cfg.num_hidden_layers)])
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
    def _trunk(self, tokens, start_pos=0, caches=None):
        """Embedding and decoder layers: -> (h [B,T,D] before norm, MoEOutput per MoE layer, (cos, sin), caches)."""
        T = tokens.shape[1]
        h = self.embed(tokens.astype(jnp.int32))
        cos, sin = self.rope(start_pos + jnp.arange(T), self.dtype)
        stats, new_caches = [], []
        for i, layer in enumerate(self.layers):
            h, st, c = layer(h, cos, sin, start_pos, None if caches is None else caches[i])
            if st is not None:
                stats.append(st)  # MoEOutput
            new_caches.append(c)
        return h, stats, (cos, sin), (None if caches is None else new_caches)

    def logits(self, tokens):
        """Traceable forward without input checks: tokens [B,T] -> logits [B,T,V]."""
        h, _, _, _ = self._trunk(tokens)
        return dense(self.head, self.norm(h))

    def __call__(self, tokens) -> jax.Array:
        self._check_tokens(tokens)
        if _is_traced(tokens):
            return self.logits(tokens)
        return _jit_logits(self, jnp.asarray(tokens))

    def forward_with_stats(self, tokens):
        """tokens [B,T] -> (logits [B,T,V], counts [n_moe_layers, E]) of the main model; bias untouched."""
        h, stats, _, _ = self._trunk(tokens)
        return dense(self.head, self.norm(h)), self._stack_counts(stats)

    def _stack_counts(self, stats):
        if not stats:
            return jnp.zeros((0, self.cfg.n_routed_experts), jnp.int32)
        return jnp.stack([o.counts for o in stats])

    # ------------------------------------------------------------------ loss
    def compute_loss(self, input_ids, labels) -> LossOutput:
        """Main CE + (lambda/D) sum_k MTP CE_k + alpha sum_routers L_Bal (REFERENCE §6, §8.2).

        labels[b, i] is the target of position i (-100 ignored). Depth k embeds roll(input_ids, -k)
        (tail 0) and predicts roll(labels, -k) with the last k masked. Nothing changes the bias.
        """
        self._check_tokens(input_ids)
        cfg = self.cfg
        input_ids = jnp.asarray(input_ids).astype(jnp.int32)
        labels = jnp.asarray(labels).astype(jnp.int32)
        T = input_ids.shape[1]
        h, stats, (cos, sin), _ = self._trunk(input_ids)
        h = self.norm(h)
        main = cross_entropy(dense(self.head, h), labels)
        mtp_losses = []
        for k, module in enumerate(self.mtp, start=1):
            tail = jnp.arange(T) >= T - k
            ids_k = jnp.where(tail, 0, jnp.roll(input_ids, -k, axis=1))
            lab_k = jnp.where(tail, IGNORE_INDEX, jnp.roll(labels, -k, axis=1))
            h, st = module(h, self.embed(ids_k), cos, sin)
            mtp_losses.append(cross_entropy(dense(self.head, module.norm(h)), lab_k))
            stats.append(st)
        D = len(self.mtp)
        mtp_losses = jnp.stack(mtp_losses) if mtp_losses else jnp.zeros((0,), jnp.float32)
        mtp_loss = cfg.mtp_loss_weight / D * jnp.sum(mtp_losses) if D else jnp.float32(0.0)
        K = cfg.num_experts_per_tok
        bal = sum((sequence_balance_loss(o.scores, K) for o in stats), jnp.float32(0.0)) * jnp.float32(
            cfg.balance_loss_alpha)
        loss = main + mtp_loss + bal
        return LossOutput(loss=loss, main_loss=main, mtp_losses=mtp_losses, mtp_loss=mtp_loss,
                          balance_loss=bal, counts=self._stack_counts(stats))

    # ----------------------------------------------------------- router bias
    def routers(self) -> list:
        """Every Router in order: main MoE layers, then the MTP depths."""
        out = [layer.ffn.gate for layer in self.layers if layer.moe]
        return out + [m.block.ffn.gate for m in self.mtp]

    def update_router_bias(self, counts, gamma=None) -> None:
        """b += gamma * sign(mean(c) - c) for every router (REFERENCE §8.1). counts [n_router_layers, E].

        In place; works inside nnx.jit. gamma defaults to cfg.bias_update_speed."""
        gamma = self.cfg.bias_update_speed if gamma is None else gamma
        c = jnp.asarray(counts).astype(jnp.float32)
        routers = self.routers()
        if c.shape != (len(routers), self.cfg.n_routed_experts):
            raise ValueError(f"counts must be [{len(routers)}, {self.cfg.n_routed_experts}], got {c.shape}")
        delta = jnp.asarray(gamma, jnp.float32) * jnp.sign(jnp.mean(c, axis=-1, keepdims=True) - c)
        for i, r in enumerate(routers):
            r.bias[...] = r.bias[...] + delta[i]

    # -------------------------------------------------------------- decoding
    def init_cache(self, batch: int, max_len: int, kind: str = "latent") -> list:
        """Per-layer caches: latent {c_kv [B,L,C], k_pe [B,L,R]} or naive {k [B,L,H,N+R], v [B,L,H,V]}."""
        if max_len > self.cfg.max_position_embeddings:
            raise ValueError(f"max_len {max_len} exceeds max_position_embeddings={self.cfg.max_position_embeddings}")
        return [layer.attn.init_cache(batch, max_len, kind) for layer in self.layers]

    def forward_cached(self, tokens, cache, start_pos):
        """tokens [B,S] at positions start_pos.. -> (logits [B,S,V], updated cache). start_pos may be traced."""
        self._check_tokens(tokens, start_pos, cache_len=next(iter(cache[0].values())).shape[1] if cache else None)
        h, _, _, cache = self._trunk(jnp.asarray(tokens), start_pos, cache)
        return dense(self.head, self.norm(h)), cache

    # ------------------------------------------------------ canonical state
    def _canonical_vars(self) -> Iterator[tuple[str, nnx.Variable, str]]:
        """(canonical name, variable, layout) with layout "id", "T" (2-D transpose) or "E" (swap last 2)."""
        yield "embed.weight", self.embed.embedding, "id"
        for i, layer in enumerate(self.layers):
            yield from _block_vars(f"layers.{i}.", layer)
        yield "norm.weight", self.norm.weight, "id"
        yield "head.weight", self.head.kernel, "T"
        for k, m in enumerate(self.mtp):
            p = f"mtp.{k}."
            yield p + "enorm.weight", m.enorm.weight, "id"
            yield p + "hnorm.weight", m.hnorm.weight, "id"
            yield p + "eh_proj.weight", m.eh_proj.kernel, "T"
            yield p + "norm.weight", m.norm.weight, "id"
            yield from _block_vars(p + "block.", m.block)

    def canonical_state(self) -> dict[str, np.ndarray]:
        """{canonical name: numpy array} in torch layout ([out, in]; experts [E, out, in])."""
        return {name: np.asarray(_to_torch(var.get_value(), lay)) for name, var, lay in self._canonical_vars()}

    def load_canonical_state(self, state) -> None:
        """Fill every variable from a torch-layout canonical dict (validated with check_state)."""
        checkpoint.check_state(state, self.cfg)
        for name, var, lay in self._canonical_vars():
            cur = var.get_value()
            var.set_value(jnp.asarray(_from_torch(np.asarray(state[name]), lay), dtype=cur.dtype))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, dtype=jnp.float32, **kwargs) -> "DeepSeekV3":
        """Load a HF-layout checkpoint: build abstractly (nnx.eval_shape), then fill (REFERENCE §10)."""
        cfg, state = checkpoint.load_canonical(os.fspath(directory))
        model = cls.abstract(cfg, dtype, **kwargs)
        model.load_canonical_state(state)
        left = [p for p, v in nnx.to_flat_state(nnx.state(model)) if not isinstance(v.get_value(), jax.Array)]
        if left:
            raise checkpoint.CheckpointError(f"variables not filled from the checkpoint: {left[:10]}")
        return model

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """config.json + safetensors with HF names (atomic writes, dsv3.checkpoint.save_canonical)."""
        checkpoint.save_canonical(os.fspath(directory), self.canonical_state(), self.cfg)

    def num_params(self) -> int:
        """Every canonical tensor's size (router biases included): sum over canonical_shapes(cfg)."""
        return sum(int(np.prod(v.get_value().shape)) for _, v, _ in self._canonical_vars())

    def num_parameters(self) -> int:
        """Trainable parameters (nnx.Param; router biases excluded), as dsv3_torch's num_parameters."""
        return sum(int(np.prod(v.get_value().shape)) for _, v, _ in self._canonical_vars()
                   if isinstance(v, nnx.Param))


def _block_vars(p: str, b: Block):
    yield p + "attn_norm.weight", b.attn_norm.weight, "id"
    yield p + "ffn_norm.weight", b.ffn_norm.weight, "id"
    a = b.attn
    for n in ("wq", "wq_a", "wq_b", "wkv_a", "wkv_b", "wo"):
        if hasattr(a, n):
            yield f"{p}attn.{n}.weight", getattr(a, n).kernel, "T"
    for n in ("q_norm", "kv_norm"):
        if hasattr(a, n):
            yield f"{p}attn.{n}.weight", getattr(a, n).weight, "id"
    f = b.ffn
    if not b.moe:
        for n in ("w1", "w2", "w3"):
            yield f"{p}ffn.{n}.weight", getattr(f, n).kernel, "T"
        return
    yield p + "ffn.gate.weight", f.gate.weight, "id"
    yield p + "ffn.gate.bias", f.gate.bias, "id"
    for n in ("w1", "w2", "w3"):
        yield f"{p}ffn.experts.{n}", getattr(f.experts, n), "E"
    if f.shared_experts is not None:
        for n in ("w1", "w2", "w3"):
            yield f"{p}ffn.shared_experts.{n}.weight", getattr(f.shared_experts, n).kernel, "T"


def _to_torch(x, layout: str):
    if layout == "T":
        return x.T
    if layout == "E":
        return jnp.swapaxes(x, -1, -2)
    return x


def _from_torch(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "T":
        return x.T
    if layout == "E":
        return np.swapaxes(x, -1, -2)
    return x


@nnx.jit
def _jit_logits(model: DeepSeekV3, tokens: jax.Array) -> jax.Array:
    return model.logits(tokens)
