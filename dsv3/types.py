"""Framework-neutral result types shared by dsv3_torch and dsv3_jax."""

from __future__ import annotations

from typing import Any, NamedTuple


class LossOutput(NamedTuple):
    """What `compute_loss` returns in both frameworks (a pytree in JAX).

    loss:         total = main + mtp + balance (scalar, fp32)
    main_loss:    next-token cross-entropy of the main head (fp32)
    mtp_losses:   [D] cross-entropy of each MTP depth (unweighted, fp32)
    mtp_loss:     (lambda / D) * sum(mtp_losses)
    balance_loss: alpha * sequence-wise balance loss summed over all routers
    counts:       [n_router_layers, E] (token, slot) assignments per expert,
                  main MoE layers first, then one row per MTP depth
    """

    loss: Any
    main_loss: Any
    mtp_losses: Any
    mtp_loss: Any
    balance_loss: Any
    counts: Any


class Routing(NamedTuple):
    """What a MoE router returns in both frameworks (a pytree in JAX). N tokens, E experts, K per token.

    scores:  [N, E] fp32 unbiased sigmoid affinities (differentiable; the balance loss uses them)
    indices: [N, K] selected experts, ascending per token (int64 in torch, int32 in JAX)
    weights: [N, K] fp32 combine weights (from the unbiased scores, normalised, scaled)
    """

    scores: Any
    indices: Any
    weights: Any
