"""The DeepSeek-V3 model (Paper §2; docs/reference.md §5 model, §6 MTP loss, §8 training rules).

Shape legend: B batch, T time, S new tokens in a cached call, D model width,
H heads, C kv latent, R rope dim, E routed experts, K experts per token,
F ffn width, V vocab.

    h = embed[tokens]                      (no scaling)
    h = layers[0..L-1](h)                  (Block: MLA + MLP | MoE, pre-norm)
    logits = head(norm(h))                 (head NOT tied to embed)

``state_dict()`` keys are exactly the canonical names of
``dsv3.names.canonical_shapes``; the interchange with other frameworks
and with disk is the flat ``{name: np.ndarray}`` of ``canonical_state()``.

Training rules kept outside ``forward`` (docs/reference.md §8.1): the forward reports
per-router expert counts; ``update_router_bias`` is the only code that ever
changes a router bias, called once per optimizer step by the training loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dsv3 import checkpoint as ckpt
from dsv3 import names
from dsv3.config import ModelConfig
from dsv3.types import LossOutput
from dsv3_torch.block import Block
from dsv3_torch.mla import visible_mask
from dsv3_torch.layers import from_numpy, linear, to_numpy
from dsv3_torch.moe import COMBINES, Experts, MoE, MoEOutput, Router, sequence_balance_loss
from dsv3_torch.mtp import MTPModule
from dsv3_torch.norm import RMSNorm
from dsv3_torch.rope import RotaryEmbedding

IGNORE_INDEX = -100


# -------------------------------------------------------------------- caches
@dataclass
class KVCache:
    """Decoding cache: per layer a dict of [B, max_len, ...] tensors, filled in place.

    latent: c_kv [B, max_len, C] (normalised) and k_pe [B, max_len, R] (rotated);
    naive:  k [B, max_len, H, N+R] and v [B, max_len, H, V].
    mask: None until a cached call gets an attention_mask; then [B, max_len] bool, True where
    the entry is a real token (entries written without a mask are real), so the later calls
    keep hiding the padded keys and count each row's positions over its real tokens only.
    """

    kind: str
    max_len: int
    layers: list
    mask: Optional[torch.Tensor] = None

    @property
    def batch(self) -> int:
        return next(iter(self.layers[0].values())).shape[0]


def cached_keys(cache: KVCache, new: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Set the cache's mask at entries start_pos.. to new [B,S] bool, in place (entries written without a
    mask are real) -> (keys [B, start_pos + S], the new entries' positions [B,S]: each row counts its real
    entries)."""
    if cache.mask is None:
        cache.mask = torch.ones(cache.batch, cache.max_len, dtype=torch.bool, device=new.device)
    end = start_pos + new.shape[1]
    cache.mask[:, start_pos:end] = new
    keys = cache.mask[:, :end]
    return keys, mask_positions(keys)[:, start_pos:]


def _shift_left(x: torch.Tensor, k: int, fill: int) -> torch.Tensor:
    """roll(x, -k) along time with the last k entries set to `fill`."""
    out = torch.full_like(x, fill)
    out[:, : x.shape[1] - k] = x[:, k:]
    return out


def mask_positions(valid: torch.Tensor) -> torch.Tensor:
    """[B, T] bool real tokens -> [B, T] positions cumsum - 1, clamped at 0: each row counts only its real
    tokens, so a left-padded row has the positions of the row alone (Hugging Face's rule)."""
    return (valid.long().cumsum(1) - 1).clamp(min=0)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean fp32 CE over labels != -100 (0 when there are none)."""
    V = logits.shape[-1]
    total = F.cross_entropy(logits.float().reshape(-1, V), labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


class DeepSeekV3(nn.Module):
    """DeepSeek-V3: embed, layers[i] (Block), norm, head, mtp[k] (MTPModule)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        D, V = cfg.hidden_size, cfg.vocab_size
        self.embed = nn.Embedding(V, D, dtype=dtype, device=device)
        self.layers = nn.ModuleList(Block(cfg, cfg.is_moe_layer(i), dtype, device)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(D, cfg.rms_norm_eps, dtype, device)
        self.head = linear(D, V, dtype, device)
        self.mtp = nn.ModuleList(MTPModule(cfg, dtype, device) for _ in range(cfg.num_nextn_predict_layers))
        self.rope = RotaryEmbedding(cfg)
        self.reset_parameters()

    def _apply(self, fn, recurse=True):
        """model.to(dtype) and friends: ``dtype`` follows the weights (the rope tables are cast to it);
        the routers keep fp32 (Router._apply)."""
        super()._apply(fn, recurse)
        self.dtype = self.embed.weight.dtype
        return self

    @classmethod
    def abstract(cls, cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> "DeepSeekV3":
        """The model on the meta device: shapes and dtypes only, allocating nothing."""
        return cls(cfg, dtype=dtype, device="meta")

    # --------------------------------------------------------------- init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """HF init: N(0, initializer_range) for linear, embedding, router and experts; norms 1; bias 0."""
        std = self.cfg.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std)
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
            elif isinstance(m, Router):
                m.weight.normal_(0.0, std)
                m.bias.zero_()
            elif isinstance(m, Experts):
                for w in (m.w1, m.w2, m.w3):
                    w.normal_(0.0, std)

    def routers(self) -> list[Router]:
        """Every router in counts order: main MoE layers, then MTP depths."""
        blocks = list(self.layers) + [m.block for m in self.mtp]
        return [b.ffn.gate for b in blocks if isinstance(b.ffn, MoE)]

    def moe_layers(self) -> list[MoE]:
        """Every MoE in counts order: main MoE layers, then MTP depths."""
        blocks = list(self.layers) + [m.block for m in self.mtp]
        return [b.ffn for b in blocks if isinstance(b.ffn, MoE)]

    def set_moe_combine(self, scheme: str) -> None:
        """'grouped' (default) or 'eager' (bit parity with HF eager experts in bf16)."""
        if scheme not in COMBINES:
            raise ValueError(f"combine scheme must be one of {COMBINES}, got {scheme!r}")
        for moe in self.moe_layers():
            moe.dispatcher.scheme = scheme

    # ------------------------------------------------------------- checks
    def _check_tokens(self, tokens: torch.Tensor, start_pos: int = 0) -> None:
        """Shape, dtype and position checks; the id range is read from eager tensors only (under
        torch.compile reading a value would end the graph), as dsv3_jax skips it under tracing."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be integer ids, got {tokens.dtype}")
        V, T = self.cfg.vocab_size, tokens.shape[1]
        if tokens.numel() and not torch.compiler.is_compiling() and (int(tokens.min()) < 0 or int(tokens.max()) >= V):
            raise ValueError(f"token ids must lie in [0, {V}), got min {int(tokens.min())}, "
                             f"max {int(tokens.max())}")
        if start_pos + T > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence of {start_pos + T} positions exceeds max_position_embeddings="
                             f"{self.cfg.max_position_embeddings}")

    def _rope(self, start: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope(torch.arange(start, start + length, device=device), self.dtype)

    def _valid(self, attention_mask: torch.Tensor, shape) -> torch.Tensor:
        """attention_mask (1 = real token, 0 = padding) -> bool, checked against the tokens' shape."""
        if tuple(attention_mask.shape) != tuple(shape):
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match the tokens {tuple(shape)}")
        return attention_mask.to(torch.bool)

    def _inputs(self, tokens: torch.Tensor, attention_mask: Optional[torch.Tensor]):
        """-> (cos, sin, mask, valid) of a full (uncached) forward; mask and valid are None without padding."""
        T = tokens.shape[1]
        if attention_mask is None:
            cos, sin = self._rope(0, T, tokens.device)
            return cos, sin, None, None
        valid = self._valid(attention_mask, tokens.shape).to(tokens.device)
        cos, sin = self.rope(mask_positions(valid), self.dtype)  # [B, T, R/2]
        return cos, sin, visible_mask(valid, 0, T), valid

    # ------------------------------------------------------------ forward
    def _trunk(self, tokens: torch.Tensor, cos, sin, start_pos: int = 0, cache: Optional[KVCache] = None,
               mask: Optional[torch.Tensor] = None, valid: Optional[torch.Tensor] = None):
        """tokens [B,T] -> (hidden BEFORE the final norm [B,T,D], MoEOutputs of main layers)."""
        h = self.embed(tokens)
        moe = []
        for i, layer in enumerate(self.layers):
            h, out, _ = layer(h, cos, sin, start_pos, None if cache is None else cache.layers[i], mask, valid)
            if out is not None:
                moe.append(out)
        return h, moe

    def forward(self, tokens: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens [B, T] int -> main-head logits [B, T, V] (model dtype).

        attention_mask: None or [B, T] (1 = real token, 0 = padding; Hugging Face's convention):
        padded keys are never attended to and each row's positions count its real tokens only,
        so a left- or right-padded row gives the logits of the row alone at its real positions."""
        self._check_tokens(tokens)
        return self.logits(tokens, attention_mask)

    def logits(self, tokens: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """forward without the input checks: tokens [B, T] -> logits [B, T, V]."""
        h, _ = self.hidden(tokens, attention_mask)
        return self.head(h)

    def hidden(self, tokens: torch.Tensor,
               attention_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, list[MoEOutput]]:
        """tokens [B, T] -> (hidden AFTER the final norm [B, T, D], MoEOutput per main MoE layer).

        With an attention_mask the MoEOutputs' counts cover the real tokens only."""
        cos, sin, mask, valid = self._inputs(tokens, attention_mask)
        h, moe = self._trunk(tokens, cos, sin, mask=mask, valid=valid)
        return self.norm(h), moe

    def compute_loss(self, input_ids: torch.Tensor, labels: torch.Tensor,
                     attention_mask: Optional[torch.Tensor] = None) -> LossOutput:
        """L = main CE + (lambda/D) sum_k L^k + alpha sum_routers L_Bal (docs/reference.md §6, §8.2).

        labels[b, i] is the target of position i (-100 ignored); depth k scores
        position i against labels[b, i + k], the last k positions masked.
        attention_mask [B, T] (1 = real, 0 = padding): labels at padded positions are ignored,
        depth k embeds token 0 where t_{i+k} is padding (as past the end), and padded tokens
        are left out of the counts and the balance loss: a padded batch scores as its rows alone.
        """
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}")
        cfg = self.cfg
        self._check_tokens(input_ids)
        cos, sin, mask, valid = self._inputs(input_ids, attention_mask)
        if valid is not None:
            labels = labels.masked_fill(~valid, IGNORE_INDEX)
        h, moe = self._trunk(input_ids, cos, sin, mask=mask, valid=valid)
        h = self.norm(h)  # h^0: the main hidden after the final norm (docs/reference.md §6)
        main = cross_entropy(self.head(h), labels)
        mtp_losses = []
        for k, mod in enumerate(self.mtp, start=1):
            ids_k = _shift_left(input_ids, k, 0)
            if valid is not None:
                ids_k = ids_k.masked_fill(~_shift_left(valid, k, False), 0)
            emb = self.embed(ids_k)                         # embed(t_{i+k}), tail token 0
            h, out = mod(h, emb, cos, sin, mask, valid)     # h^k before its norm feeds depth k+1
            moe.append(out)
            labels_k = _shift_left(labels, k, IGNORE_INDEX)
            if valid is not None:  # a padded position i never scores, whatever labels[i + k]
                labels_k = labels_k.masked_fill(~valid, IGNORE_INDEX)
            mtp_losses.append(cross_entropy(self.head(mod.norm(h)), labels_k))
        zero = main.new_zeros(())
        n_mtp = len(self.mtp)  # MTP depths (the Paper's D; D is the model width here)
        mtp_losses = torch.stack(mtp_losses) if mtp_losses else main.new_zeros(0)
        mtp_loss = cfg.mtp_loss_weight / n_mtp * mtp_losses.sum() if n_mtp else zero
        K = cfg.num_experts_per_tok
        balance = sum((sequence_balance_loss(o.scores, K, valid) for o in moe), zero) * cfg.balance_loss_alpha
        counts = (torch.stack([o.counts for o in moe]) if moe
                  else torch.zeros(0, cfg.n_routed_experts, dtype=torch.long, device=input_ids.device))
        return LossOutput(main + mtp_loss + balance, main, mtp_losses, mtp_loss, balance, counts)

    @torch.no_grad()
    def update_router_bias(self, counts: torch.Tensor, gamma: Optional[float] = None) -> None:
        """b += gamma * sign(mean(c) - c) for every router (docs/reference.md §8.1); counts [n_router_layers, E]."""
        routers = self.routers()
        counts = torch.as_tensor(counts)
        if tuple(counts.shape) != (len(routers), self.cfg.n_routed_experts):
            raise ValueError(f"counts must be [{len(routers)}, {self.cfg.n_routed_experts}], "
                             f"got {tuple(counts.shape)}")
        gamma = self.cfg.bias_update_speed if gamma is None else gamma
        for router, c in zip(routers, counts.to(torch.float32)):
            c = c.to(router.bias.device)
            router.bias += gamma * torch.sign(c.mean() - c)

    # ------------------------------------------------------------ decoding
    def init_cache(self, batch: int, max_len: int, kind: str = "latent") -> KVCache:
        """An empty KVCache: per layer latent {c_kv, k_pe} or naive {k, v}, [B, max_len, ...]."""
        if max_len > self.cfg.max_position_embeddings:
            raise ValueError(f"max_len={max_len} exceeds max_position_embeddings="
                             f"{self.cfg.max_position_embeddings}")
        return KVCache(kind, max_len, [layer.attn.init_cache(batch, max_len, kind) for layer in self.layers])

    def hidden_cached(self, tokens: torch.Tensor, cache: KVCache, start_pos: int,
                      attention_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, KVCache]:
        """tokens [B, S] at cache entries start_pos.. -> (hidden AFTER the final norm [B, S, D], cache filled in place).

        The h^0 an MTP depth takes (speculative decoding). attention_mask: None or [B, S] for the
        new tokens only (1 = real, 0 = padding), kept in ``cache.mask`` so that every later call
        hides the padded entries and gives each row the positions of its real tokens; a call
        without one on such a cache feeds real tokens."""
        self._check_tokens(tokens, start_pos)
        S = tokens.shape[1]
        if start_pos < 0 or start_pos + S > cache.max_len:
            raise ValueError(f"positions [{start_pos}, {start_pos + S}) do not fit a cache of {cache.max_len}")
        if tokens.shape[0] != cache.batch:
            raise ValueError(f"tokens batch size {tokens.shape[0]} does not match the cache's {cache.batch}")
        if attention_mask is None and cache.mask is None:
            cos, sin = self._rope(start_pos, S, tokens.device)
            h, _ = self._trunk(tokens, cos, sin, start_pos, cache)
            return self.norm(h), cache
        new = (torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None
               else self._valid(attention_mask, tokens.shape).to(tokens.device))
        keys, positions = cached_keys(cache, new, start_pos)
        cos, sin = self.rope(positions, self.dtype)  # [B, S, R/2]
        h, _ = self._trunk(tokens, cos, sin, start_pos, cache, visible_mask(keys, start_pos, S), new)
        return self.norm(h), cache

    def forward_cached(self, tokens: torch.Tensor, cache: KVCache, start_pos: int,
                       attention_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, KVCache]:
        """tokens [B, S] at cache entries start_pos.. -> (logits [B, S, V], cache filled in place).

        attention_mask: as in hidden_cached."""
        h, cache = self.hidden_cached(tokens, cache, start_pos, attention_mask)
        return self.head(h), cache

    # --------------------------------------------------------- checkpoints
    def canonical_state(self) -> dict[str, np.ndarray]:
        """{canonical name: numpy array} in torch layout (bf16 as ml_dtypes.bfloat16)."""
        return {k: to_numpy(v) for k, v in self.state_dict().items()}

    def load_canonical_state(self, state: dict) -> None:
        """Load a canonical flat dict (validated: CheckpointError names bad keys).

        Each tensor is converted to the dtype of the tensor it replaces (router
        weight and bias stay fp32 in a bf16 model).
        """
        names.check_state(state, self.cfg)
        current = self.state_dict()
        on_meta = any(t.is_meta for t in current.values())
        tensors = {}
        for name, ref in current.items():
            t = from_numpy(state[name]).to(ref.dtype)
            tensors[name] = t if on_meta else t.to(ref.device)
        self.load_state_dict(tensors, strict=True, assign=on_meta)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        cfg: Optional[ModelConfig] = None) -> "DeepSeekV3":
        """Load a HF-layout checkpoint (bf16, fp32 or block-FP8) without a random init."""
        cfg, state = ckpt.load_canonical(os.fspath(directory), cfg)
        model = cls(cfg, dtype=dtype, device="meta")
        model.load_canonical_state(state)
        return model

    def save_pretrained(self, directory: str | os.PathLike, max_shard_bytes: int = 2 * 1024**3) -> None:
        """config.json + HF-named safetensors (atomic writes, sharded above max_shard_bytes)."""
        ckpt.save_canonical(os.fspath(directory), self.canonical_state(), self.cfg, max_shard_bytes)

    def num_params(self) -> int:
        """Parameters counted once (router bias excluded: a buffer)."""
        return sum(p.numel() for p in self.parameters())
