"""Expert parallelism behind the MoE dispatch seam (dropless, uneven all-to-all).

``ExpertParallelDispatcher`` replaces an MoE's single-device dispatcher (same
interface: ``dispatch(x, routing) -> (x_sorted, group_sizes, plan)`` and
``combine(y_sorted, plan, routing) -> y``); the router and the experts' maths
are untouched. With ``ep`` ranks in the expert group and E experts, rank j
owns experts j*E/ep .. (j+1)*E/ep - 1.

dispatch
  1. sort this rank's (token, slot) rows by expert (the single-device sort);
  2. exchange the per-expert row counts with ``all_to_all_single`` -> how many
     rows every rank sends to each of this rank's experts;
  3. send the rows with the autograd ``all_to_all_single`` (uneven splits,
     zero-size ones included): no capacity, nothing dropped;
  4. permute the received rows from rank-major to expert-major, so each local
     expert's rows are contiguous.
combine
  the inverse permutation, the reverse all-to-all, then the single-device
  combine on this rank's own rows (the same weights, slot order and dtype).

``plan.counts`` are this rank's tokens' counts over ALL E experts, as on one
device; the training step sums them over every rank before the bias update.

``ExpertParallelExperts`` is the Experts module whose stacked weights are
DTensors sharded over the expert axis: it runs each LOCAL expert on its rows
(zero-row experts included, so every rank's weights always receive a gradient
and the FSDP reduce-scatters match across ranks), through
``dsv3_torch.moe.grouped_swiglu`` as the single-device experts do.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from dsv3_torch.moe import grouped_swiglu, weights_for


def _a2a(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Differentiable all_to_all_single with uneven splits."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    return all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group)


def _local(w: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return w.to_local() if isinstance(w, DTensor) else w


class EPPlan(NamedTuple):
    local: object         # the single-device plan of this rank's rows (sorted by global expert id)
    perm: torch.Tensor    # received rank-major row -> expert-major order
    inv: torch.Tensor     # its inverse
    send: list            # rows sent to each rank of the expert group
    recv: list            # rows received from each rank

    @property
    def counts(self) -> torch.Tensor:
        """[E] this rank's (token, slot) rows per expert (int64)."""
        return self.local.counts


class ExpertParallelDispatcher:
    """Dropless token exchange over the expert group; wraps the MoE's single-device dispatcher."""

    def __init__(self, local, group):
        self.inner = local
        self.group = group
        self.ep = dist.get_world_size(group)
        self.n_experts = local.n_experts
        if self.n_experts % self.ep:
            raise ValueError(f"{self.n_experts} experts cannot be split over {self.ep} expert ranks")
        self.n_local = self.n_experts // self.ep

    @property
    def scheme(self) -> str:
        """The combine scheme ("grouped" | "eager") of the wrapped single-device dispatcher."""
        return self.inner.scheme

    @scheme.setter
    def scheme(self, value: str) -> None:
        self.inner.scheme = value

    @property
    def top_k(self) -> int:
        return self.inner.top_k

    @classmethod
    def from_local(cls, local, group) -> "ExpertParallelDispatcher":
        return local if isinstance(local, cls) else cls(local, group)

    def dispatch(self, x: torch.Tensor, routing):
        xs, sizes, d = self.inner.dispatch(x, routing)  # [M, D] sorted by global expert id
        ep, El = self.ep, self.n_local
        counts = d.counts.to(torch.int64)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        rc = recv_counts.view(ep, El)                    # [source rank, local expert]
        send = counts.view(ep, El).sum(1).tolist()
        recv = rc.sum(1).tolist()
        x_recv = _a2a(xs, recv, send, self.group)        # rank-major: (source, local expert, row)
        seg = torch.repeat_interleave(torch.arange(ep * El, device=rc.device), rc.reshape(-1))
        key = (seg % El) * ep + seg // El                # expert-major: (local expert, source)
        perm = torch.argsort(key, stable=True)
        inv = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))
        x_sorted = x_recv.index_select(0, perm.to(x_recv.device))
        return x_sorted, rc.sum(0).tolist(), EPPlan(d, perm, inv, send, recv)

    def compute(self, experts, x_sorted: torch.Tensor, group_sizes) -> torch.Tensor:
        """The MoE's experts (this rank's, see ExpertParallelExperts) on the received rows."""
        return self.inner.compute(experts, x_sorted, group_sizes)

    def combine(self, y_sorted: torch.Tensor, plan: EPPlan, routing) -> torch.Tensor:
        y_recv = y_sorted.index_select(0, plan.inv.to(y_sorted.device))
        y_rows = _a2a(y_recv, plan.send, plan.recv, self.group)  # this rank's rows, sorted by global expert id
        return self.inner.combine(y_rows, plan.local, routing)


_SUBCLASSES: dict = {}


class ExpertParallelExperts:
    """Mixin for an Experts module whose w1, w2, w3 are DTensors sharded over the expert axis."""

    @classmethod
    def subclass_of(cls, base: type) -> type:
        """The class ``(ExpertParallelExperts, base)``, one per base."""
        if issubclass(base, cls):
            return base
        if base not in _SUBCLASSES:
            _SUBCLASSES[base] = type(f"ExpertParallel{base.__name__}", (cls, base), {})
        return _SUBCLASSES[base]

    def forward(self, x_sorted: torch.Tensor, group_sizes: list[int]) -> torch.Tensor:
        """x_sorted [R, D] grouped by LOCAL expert, group_sizes [E_local] -> y_sorted [R, D]."""
        w1, w2, w3 = weights_for(x_sorted, *(_local(w) for w in (self.w1, self.w2, self.w3)))
        if len(group_sizes) != w1.shape[0]:
            raise ValueError(f"{len(group_sizes)} group sizes for {w1.shape[0]} local experts")
        return grouped_swiglu(x_sorted, w1, w2, w3, group_sizes)  # zero-row experts: zero gradients
