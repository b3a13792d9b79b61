"""Parameter, FLOP and KV-cache byte counts of a ModelConfig.

Framework-free (imports neither torch nor jax). Used by ``dsv3 bench`` to turn
measured step times into model-FLOPs utilisation (MFU), and by ``dsv3 info`` and ``dsv3 train``.

Conventions (the documented formula)
------------------------------------
* A matmul of an ``[n, k]`` input by a ``[k, m]`` weight costs ``2·n·k·m``
  FLOPs (one multiply and one add per MAC). Element-wise work (norms, RoPE,
  SiLU, softmax, the router's sigmoid and top-k, the loss) is not counted: it
  is a few percent at most and is not what a matmul peak measures.
* **Matmul parameters** are the weights used as a matmul per token: every
  linear layer, the router ``gate`` and the output ``head``. The embedding is a
  lookup, norms are element-wise, the router bias is a selection offset: none
  is a matmul parameter.
* **Active** means what one token touches: the ``K`` routed experts it is sent
  to plus the shared experts, not all ``E`` experts.
* **Forward FLOPs per token** = ``2 · active matmul parameters`` + attention,
  where attention per layer and token is ``2·H·(qk_head_dim + v_head_dim)·n``
  (scores ``q·kᵀ`` and the weighted sum ``p·v``) with ``n`` the number of keys
  the token attends to. Causal training over a window of ``T`` tokens attends
  on average to ``n = (T + 1) / 2`` keys (position i sees i + 1 keys); this is
  counted exactly, not the ``T`` of non-causal formulas (PaLM's ``12·L·H·Q·T``
  counts ``n = T`` for fwd+bwd).
* **Training** = forward + backward = ``3 ×`` forward (backward computes the
  gradients of the activations and of the weights: two matmuls per forward
  matmul). The optimizer and the router-bias update are not counted.
* **MTP** (docs/reference.md §6): each depth runs ``eh_proj`` (``2D → D``), one MoE
  decoder layer with its own causal attention, and the shared ``head`` once
  more, over all ``T`` positions (the last ``k`` targets are masked, but the
  positions are computed).
* **KV cache bytes per token** (docs/reference.md §2.1), over the main model's layers:
  ``latent`` = ``(kv_lora_rank + qk_rope_head_dim)·L`` values (the absorbed
  path's normalised ``c_kv`` and rotated ``k_pe``); ``naive`` = the expanded
  ``K [H, qk_nope + qk_rope]`` and ``V [H, v]`` per layer, i.e. ``H·(qk_head_dim
  + v_head_dim)·L``, which is exactly a standard multi-head cache of the same
  head shapes; ``mha`` = the Paper's Table 1 multi-head baseline
  ``2·H·d_h·L`` with ``d_h = v_head_dim`` (no decoupled rope key).
"""

from __future__ import annotations

from dataclasses import dataclass, asdict
from functools import partial

from dsv3.config import ModelConfig

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp8": 1}


def _bytes(dtype: str | int) -> int:
    if isinstance(dtype, int):
        return dtype
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


# ----------------------------------------------------------------- parameters
def attention_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameters of one MLA block, split into matmul weights and norm weights."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    C, R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    if cfg.q_lora_rank is None:
        q_mm, q_norm = D * H * cfg.qk_head_dim, 0
    else:
        q_mm = D * cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim
        q_norm = cfg.q_lora_rank
    kv_mm = D * (C + R) + C * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    o_mm = H * cfg.v_head_dim * D
    return {"matmul": q_mm + kv_mm + o_mm, "norm": q_norm + C}


def dense_ffn_params(cfg: ModelConfig) -> int:
    return 3 * cfg.hidden_size * cfg.intermediate_size


def moe_params(cfg: ModelConfig) -> dict[str, int]:
    """One MoE layer: router, all routed experts, shared experts; and per-token active."""
    D, E, F, K = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    S = cfg.n_shared_experts * F
    expert = 3 * D * F
    return {
        "router": E * D,
        "router_bias": E,
        "routed": E * expert,
        "shared": 3 * D * S,
        "total": E * D + E + E * expert + 3 * D * S,
        "active_matmul": E * D + K * expert + 3 * D * S,
    }


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts: trainable parameters, as the models count them (``num_parameters()``).

    The router's correction bias is a buffer (set by the bias update, never by
    the optimizer), so it is not a parameter: ``router_biases`` counts it
    apart, and ``total + router_biases`` is every value of a checkpoint, the
    sum over ``dsv3.names.canonical_shapes``.
    """

    total: int  # every parameter, MTP included
    main: int  # without the MTP modules
    mtp: int  # the MTP modules' own parameters (they share embed and head)
    embedding: int
    head: int
    routed_experts: int  # main model, all E routed experts of every MoE layer
    active_per_token: int  # main model, embedding included (the Paper's "37B activated")
    active_matmul_per_token: int  # main model, matmul weights only (drives the FLOPs)
    mtp_active_matmul_per_token: int  # one pass through all MTP depths, head included
    router_biases: int  # buffers, main model and MTP: one per routed expert of each router

    @property
    def stored(self) -> int:
        """Values in a checkpoint: parameters and router biases."""
        return self.total + self.router_biases

    def as_dict(self) -> dict:
        return {**asdict(self), "stored": self.stored}


def param_counts(cfg: ModelConfig) -> ParamCounts:
    D, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    att = attention_params(cfg)
    moe = moe_params(cfg)
    moe_layer = moe["total"] - moe["router_bias"]
    n_dense, n_moe = cfg.first_k_dense_replace, cfg.n_moe_layers
    block_common = att["matmul"] + att["norm"] + 2 * D  # attn + its norms + attn_norm, ffn_norm
    layers = L * block_common + n_dense * dense_ffn_params(cfg) + n_moe * moe_layer
    main = V * D + layers + D + V * D  # embed, layers, final norm, head
    mtp_one = 2 * D + 2 * D * D + D + block_common + moe_layer  # enorm hnorm, eh_proj, norm, block
    mtp = cfg.num_nextn_predict_layers * mtp_one

    act_layers = (L * att["matmul"] + n_dense * dense_ffn_params(cfg) + n_moe * moe["active_matmul"])
    active_matmul = act_layers + V * D  # + head
    active = active_matmul + V * D + L * (att["norm"] + 2 * D) + D
    mtp_active = cfg.num_nextn_predict_layers * (2 * D * D + att["matmul"] + moe["active_matmul"] + V * D)
    return ParamCounts(total=main + mtp, main=main, mtp=mtp, embedding=V * D, head=V * D,
                       routed_experts=n_moe * moe["routed"], active_per_token=active,
                       active_matmul_per_token=active_matmul, mtp_active_matmul_per_token=mtp_active,
                       router_biases=cfg.n_router_layers * moe["router_bias"])


# ---------------------------------------------------------------------- FLOPs
def attention_flops_per_token(cfg: ModelConfig, keys: float) -> float:
    """Scores and weighted sum of one layer for one query attending to ``keys`` keys."""
    H = cfg.num_attention_heads
    return 2.0 * H * (cfg.qk_head_dim + cfg.v_head_dim) * keys


def causal_mean_keys(seq_len: int) -> float:
    """Mean number of keys a query attends to in a causal window of ``seq_len``."""
    return (seq_len + 1) / 2.0


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, mtp: bool = False) -> float:
    """Forward FLOPs per token of a causal pass over windows of ``seq_len`` tokens.

    ``mtp=True`` adds every MTP depth (what ``compute_loss`` runs); the plain
    ``model(tokens)`` forward is ``mtp=False``.
    """
    pc = param_counts(cfg)
    keys = causal_mean_keys(seq_len)
    f = 2.0 * pc.active_matmul_per_token + cfg.num_hidden_layers * attention_flops_per_token(cfg, keys)
    if mtp and cfg.num_nextn_predict_layers:
        f += 2.0 * pc.mtp_active_matmul_per_token
        f += cfg.num_nextn_predict_layers * attention_flops_per_token(cfg, keys)
    return f


def train_flops_per_token(cfg: ModelConfig, seq_len: int, mtp: bool = True) -> float:
    """Forward + backward = 3 x forward (optimizer and bias update not counted)."""
    return 3.0 * forward_flops_per_token(cfg, seq_len, mtp=mtp)


def train_flops_per_step(cfg: ModelConfig, batch: int, seq_len: int, mtp: bool = True) -> float:
    return batch * seq_len * train_flops_per_token(cfg, seq_len, mtp=mtp)


def forward_flops_per_step(cfg: ModelConfig, batch: int, seq_len: int, mtp: bool = False) -> float:
    return batch * seq_len * forward_flops_per_token(cfg, seq_len, mtp=mtp)


def mtp_flop_share(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs with MTP divided by training FLOPs without (>= 1)."""
    return train_flops_per_token(cfg, seq_len, True) / train_flops_per_token(cfg, seq_len, False)


def decode_flops_per_token(cfg: ModelConfig, context: int, kind: str = "latent") -> float:
    """FLOPs to decode one token that attends to ``context`` cached positions.

    ``naive``: the new token's K/V are expanded through ``wkv_b`` and attention
    runs over expanded heads, ``2·H·(qk + v)·context``.
    ``latent`` (absorbed): ``q_nope`` is mapped into the latent space by
    ``W_UK`` and the output back by ``W_UV`` (together as many FLOPs as
    ``wkv_b``), and attention runs in the latent space,
    ``2·H·((C + R) + C)·context``: more FLOPs per key than naive on narrow heads,
    but it reads ``H·(qk+v)/(C+R)`` times fewer cache bytes.
    """
    pc = param_counts(cfg)
    H, C, R = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    if kind == "naive":
        att = attention_flops_per_token(cfg, context)
    elif kind == "latent":
        att = 2.0 * H * ((C + R) + C) * context
    else:
        raise ValueError(f"kind must be 'latent' or 'naive', got {kind!r}")
    return 2.0 * pc.active_matmul_per_token + cfg.num_hidden_layers * att


def expand_latent_keys(cfg: ModelConfig, queries: int) -> bool:
    """Whether a cached call of ``queries`` new tokens costs fewer FLOPs on keys expanded from the latent cache
    (``wkv_b`` on every cached key, then naive attention, as in training) than absorbed on the latents.

    Per (query, key) pair absorbed attention takes ``H·(2C + R)`` multiply-adds and naive ``H·(N + R + V)``
    (``decode_flops_per_token``); expanding a key takes ``H·C·(N + V)``. So expanding pays once
    ``queries · (2C − N − V) > C · (N + V)``: a prefill (from 171 queries for V3's head shapes, 65 for
    peer-small's), never a decode step.
    """
    C, N, V = cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.v_head_dim
    return queries * (2 * C - N - V) > C * (N + V)


CAUSAL_QUERY_BLOCK = 128  # queries per block of a causal call (causal_query_block)
CAUSAL_MAX_BLOCKS = 8  # longer calls take larger blocks: each block is its own products, traced and compiled in JAX


def causal_query_block(queries: int) -> int:
    """Queries per block where a causal call of ``queries`` queries attends block by block, each block on the
    keys up to its own last position only (the later keys are masked for all of its queries).

    ``n`` blocks compute ``(n + 1) / 2n`` of the score and value products of one block (3/4 for a 256-token
    training window in 2 blocks) and hold ``[B, H, block, T]`` scores at a time. Blocks are
    ``CAUSAL_QUERY_BLOCK`` queries, or the smallest multiple of it that keeps them to ``CAUSAL_MAX_BLOCKS``
    (a 4032-token prompt: 8 blocks of 512); below ``2 · CAUSAL_QUERY_BLOCK`` queries, one block (returns
    ``queries``). Figures: docs/bench/README.md, "Measured choices in the code".
    """
    if queries < 2 * CAUSAL_QUERY_BLOCK:
        return queries
    per = -(-queries // CAUSAL_MAX_BLOCKS)
    return -(-per // CAUSAL_QUERY_BLOCK) * CAUSAL_QUERY_BLOCK


def moe_layer_flops_per_token(cfg: ModelConfig) -> dict[str, float]:
    """Forward FLOPs per token of one MoE layer, and the width of a dense SwiGLU
    MLP doing the same expert FLOPs (``(K + n_shared)·F``; the router's ``2·E·D``
    comes on top for the MoE)."""
    D, F = cfg.hidden_size, cfg.moe_intermediate_size
    width = (cfg.num_experts_per_tok + cfg.n_shared_experts) * F
    experts = 2.0 * 3 * D * width
    return {"router": 2.0 * cfg.n_routed_experts * D, "experts": experts,
            "total": experts + 2.0 * cfg.n_routed_experts * D, "dense_equivalent_width": width}


# ------------------------------------------------------------ matmul shapes
@dataclass(frozen=True)
class Matmul:
    """``count`` products ``C[b, m, n] = A[b, m, k] · B[b, k, n]`` of one step (b = 1: a 2-D matmul).

    ``layout`` is how the operands are stored: ``nn`` A·B; ``nt`` A·Wᵀ with W ``[n, k]`` (a Linear's
    forward); ``tn`` Aᵀ·B with A ``[k, m]`` (a weight gradient, Xᵀ·dY). ``count`` may be fractional: causal
    attention computes ``(T + 1) / 2T`` of each ``[T, T]`` product (the FLOP convention above), and a routed
    expert's rows are the balanced ``N·K/E``.
    """

    b: int
    m: int
    k: int
    n: int
    layout: str
    count: float
    what: str

    @property
    def flops(self) -> float:
        return 2.0 * self.b * self.m * self.k * self.n * self.count

    @property
    def shape(self) -> tuple[int, int, int, int, str]:
        return self.b, self.m, self.k, self.n, self.layout


KERNELS = ("out_in", "in_out")


def _linear(rows: int, d_in: int, d_out: int, count: float, what: str, train: bool,
            kernels: str = "out_in", dx: str | None = None) -> list[Matmul]:
    """A Linear's products. ``kernels="out_in"`` (torch, W [out, in]): y = x · Wᵀ (nt), dx = dy · W (nn),
    dW = dyᵀ · x (tn, [out, in]); ``"in_out"`` (Flax, W [in, out]): y = x · W (nn), dx = dy · Wᵀ (nt),
    dW = xᵀ · dy (tn, [in, out]). ``dx`` overrides the layout of dx (an expert loop that transposes its
    weights once)."""
    if kernels == "out_in":
        out = [Matmul(1, rows, d_in, d_out, "nt", count, what)]
        back = [Matmul(1, rows, d_out, d_in, dx or "nn", count, what + " dx"),
                Matmul(1, d_out, rows, d_in, "tn", count, what + " dW")]
    else:
        out = [Matmul(1, rows, d_in, d_out, "nn", count, what)]
        back = [Matmul(1, rows, d_out, d_in, dx or "nt", count, what + " dx"),
                Matmul(1, d_in, rows, d_out, "tn", count, what + " dW")]
    return out + back if train else out


def _attention(cfg: ModelConfig, batch: int, seq: int, count: float, train: bool) -> list[Matmul]:
    """Scores q·kᵀ and the weighted sum p·v per (sequence, head), causal share of the [T, T] products; in
    training dp = do·vᵀ, dv = pᵀ·do, dq = ds·k, dk = dsᵀ·q."""
    b, T, qk, v = batch * cfg.num_attention_heads, seq, cfg.qk_head_dim, cfg.v_head_dim
    c = count * causal_mean_keys(seq) / seq
    out = [Matmul(b, T, qk, T, "nt", c, "attention scores"), Matmul(b, T, T, v, "nn", c, "attention p·v")]
    if train:
        out += [Matmul(b, T, v, T, "nt", c, "attention dp"), Matmul(b, T, T, v, "tn", c, "attention dv"),
                Matmul(b, T, T, qk, "nn", c, "attention dq"), Matmul(b, T, T, qk, "tn", c, "attention dk")]
    return out


def _mla(cfg: ModelConfig, batch: int, seq: int, count: float, train: bool, kernels: str) -> list[Matmul]:
    N, D, H = batch * seq, cfg.hidden_size, cfg.num_attention_heads
    C, R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    lin = partial(_linear, count=count, train=train, kernels=kernels)
    if cfg.q_lora_rank is None:
        out = lin(N, D, H * cfg.qk_head_dim, what="wq")
    else:
        out = lin(N, D, cfg.q_lora_rank, what="wq_a")
        out += lin(N, cfg.q_lora_rank, H * cfg.qk_head_dim, what="wq_b")
    out += lin(N, D, C + R, what="wkv_a")
    out += lin(N, C, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), what="wkv_b")
    out += _attention(cfg, batch, seq, count, train)
    return out + lin(N, H * cfg.v_head_dim, D, what="wo")


def _swiglu(rows: int, d: int, width: int, count: float, what: str, train: bool, kernels: str,
            dx: str | None = None) -> list[Matmul]:
    return (_linear(rows, d, width, 2 * count, what + " w1/w3", train, kernels, dx)
            + _linear(rows, width, d, count, what + " w2", train, kernels, dx))


def _moe(cfg: ModelConfig, tokens: int, count: float, train: bool, kernels: str) -> list[Matmul]:
    """Router, the E routed experts on their balanced share of the routed rows, the shared experts. With
    ``in_out`` kernels the routed experts' dx is ``nn``: dsv3_jax's expert loop transposes its weights
    once before its backward (``dsv3_jax.moe._loop_swiglu_bwd``)."""
    D, E, F = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
    routed = tokens * cfg.num_experts_per_tok  # rows over all experts
    rows = max(1, round(routed / E))
    out = _linear(tokens, D, E, count, "router", train, kernels)
    out += _swiglu(rows, D, F, count * routed / rows, "routed expert", train, kernels,
                   dx="nn" if kernels == "in_out" else None)
    if cfg.n_shared_experts:
        out += _swiglu(tokens, D, cfg.n_shared_experts * F, count, "shared experts", train, kernels)
    return out


def step_matmuls(cfg: ModelConfig, batch: int, seq_len: int, mtp: bool = True, train: bool = True,
                 kernels: str = "out_in") -> list[Matmul]:
    """Every matmul of one step over ``batch`` windows of ``seq_len`` tokens (forward, and with ``train``
    its backward), equal shapes merged: their FLOPs sum to ``train_flops_per_step`` (or
    ``forward_flops_per_step``). ``kernels``: how the framework stores a Linear's weight (``out_in``:
    torch's [out, in]; ``in_out``: Flax's [in, out]), which sets each product's operand layout
    (``_linear``). ``dsv3 bench`` times each shape alone and sums the times into the step's matmul floor."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, not {kernels!r}")
    N, D, V = batch * seq_len, cfg.hidden_size, cfg.vocab_size
    L, n_dense = cfg.num_hidden_layers, cfg.first_k_dense_replace
    out = _mla(cfg, batch, seq_len, L, train, kernels)
    out += _swiglu(N, D, cfg.intermediate_size, n_dense, "dense MLP", train, kernels)
    out += _moe(cfg, N, cfg.n_moe_layers, train, kernels)
    out += _linear(N, D, V, 1, "head", train, kernels)
    depths = cfg.num_nextn_predict_layers if mtp else 0
    if depths:
        out += _linear(N, 2 * D, D, depths, "MTP eh_proj", train, kernels)
        out += _mla(cfg, batch, seq_len, depths, train, kernels) + _moe(cfg, N, depths, train, kernels)
        out += _linear(N, D, V, depths, "head", train, kernels)
    merged: dict[tuple, Matmul] = {}
    for mm in out:
        if mm.shape in merged:
            old = merged[mm.shape]
            what = old.what if mm.what in old.what.split(", ") else f"{old.what}, {mm.what}"
            mm = Matmul(*mm.shape, old.count + mm.count, what)
        merged[mm.shape] = mm
    return list(merged.values())


# ------------------------------------------------------------------- KV cache
def kv_cache_values_per_token(cfg: ModelConfig) -> dict[str, int]:
    """Cached values per token over the main model's layers (see the module doc)."""
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    return {
        "latent": (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * L,
        "naive": H * (cfg.qk_head_dim + cfg.v_head_dim) * L,
        "mha": 2 * H * cfg.v_head_dim * L,
    }


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype: str | int = "bf16") -> dict[str, int]:
    b = _bytes(dtype)
    return {k: v * b for k, v in kv_cache_values_per_token(cfg).items()}


def summary(cfg: ModelConfig, seq_len: int, batch: int = 1, dtype: str = "fp32") -> dict:
    """Everything above for one config, as a JSON-ready dict."""
    return {
        "params": param_counts(cfg).as_dict(),
        "seq_len": seq_len,
        "batch": batch,
        "forward_flops_per_token": forward_flops_per_token(cfg, seq_len, mtp=False),
        "forward_flops_per_token_mtp": forward_flops_per_token(cfg, seq_len, mtp=True),
        "train_flops_per_token": train_flops_per_token(cfg, seq_len, mtp=False),
        "train_flops_per_token_mtp": train_flops_per_token(cfg, seq_len, mtp=True),
        "train_flops_per_step": train_flops_per_step(cfg, batch, seq_len, mtp=False),
        "train_flops_per_step_mtp": train_flops_per_step(cfg, batch, seq_len, mtp=True),
        "mtp_flop_share": mtp_flop_share(cfg, seq_len),
        "moe_layer_flops_per_token": moe_layer_flops_per_token(cfg),
        "kv_cache_values_per_token": kv_cache_values_per_token(cfg),
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(cfg, dtype),
        "kv_cache_dtype": dtype,
    }
