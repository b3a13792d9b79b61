"""The reference rows: Hugging Face transformers' DeepseekV3ForCausalLM trained
on the same weights and the same batch (no MTP, no router-bias update: HF has
neither), with eager attention and each available experts backend.

Weights travel as the project's canonical state -> ``dsv3.checkpoint.save_canonical``
(HF names, per-expert tensors) in a temporary directory -> ``from_pretrained``.
"""

from __future__ import annotations

import tempfile

from dsv3.bench.common import BETAS, CLIP, LR, WEIGHT_DECAY, Ctx
from dsv3.bench.timing import PeakMemory, measure, torch_sync
from dsv3.checkpoint import save_canonical

EXPERT_BACKENDS = ("eager", "grouped_mm")


def available() -> bool:
    try:
        import transformers  # noqa: F401
        from transformers import DeepseekV3ForCausalLM  # noqa: F401
    except Exception:  # noqa: BLE001 - optional dependency
        return False
    return True


def load(directory: str, ctx: Ctx, experts: str):
    from transformers import DeepseekV3ForCausalLM

    from dsv3.bench.rows_torch import torch_dtype

    model = DeepseekV3ForCausalLM.from_pretrained(directory, attn_implementation="eager",
                                                  experts_implementation=experts, dtype=torch_dtype(ctx.dtype))
    return model.to(ctx.device)


def run_all(ctx: Ctx, sections: list[str]) -> None:
    if not available():
        ctx.log("  transformers not installed: no HF reference rows")
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetic
        pass
    with tempfile.TemporaryDirectory(prefix="dsv3-bench-hf-") as d:
        save_canonical(d, ctx.weights(False), ctx.cfg_nomtp)
        for experts in EXPERT_BACKENDS:
            if "train" in sections:
                name = f"HF eager-attn {experts}-experts"
                ctx.guard("train", name, "hf", lambda: _train_row(ctx, d, experts, name), variant=experts,
                          mtp=False)
            if "prefill" in sections:
                name = f"HF eager-attn {experts}-experts"
                ctx.guard("prefill", name, "hf", lambda: _prefill_row(ctx, d, experts, name), variant=experts)


def _batch(ctx: Ctx):
    import torch

    return (torch.as_tensor(ctx.inputs, dtype=torch.long, device=ctx.device),
            torch.as_tensor(ctx.labels, dtype=torch.long, device=ctx.device))


def _train_row(ctx: Ctx, d: str, experts: str, name: str) -> None:
    import torch
    import torch.nn.functional as F

    model = load(d, ctx, experts).train()
    params = [p for p in model.parameters() if p.requires_grad]
    # The same optimizer as dsv3_torch.train: decay on matrices only, per-tensor (foreach=False) AdamW.
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=BETAS, foreach=ctx.args.hf_foreach)
    x, y = _batch(ctx)
    V = ctx.cfg.vocab_size

    def step():
        # Same loss as compute_loss's main term: labels already shifted, fp32 CE.
        logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, V), y.reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    losses = []

    def timed():
        loss = step()
        if not losses:
            losses.append(float(loss.detach()))
        return loss

    with PeakMemory(ctx.device, "hf") as mem:
        t = measure(timed, torch_sync(ctx.device), warmup=ctx.warmup, reps=ctx.reps)
    ctx.add("train", name, "hf", t, tokens=ctx.batch * ctx.seq, model_flops=ctx.train_flops(False), mem=mem,
            variant=experts, mtp=False, loss_first=losses[0], main_loss_first=losses[0],
            loss_after=float(step().detach()), step_impl="bench step: HF forward, fp32 CE, clip, AdamW")


def _prefill_row(ctx: Ctx, d: str, experts: str, name: str) -> None:
    import torch

    model = load(d, ctx, experts).eval()
    x, _ = _batch(ctx)
    with torch.inference_mode(), PeakMemory(ctx.device, "hf") as mem:
        t = measure(lambda: model(input_ids=x, use_cache=False).logits, torch_sync(ctx.device),
                    warmup=ctx.warmup, reps=ctx.reps)
    ctx.add("prefill", name, "hf", t, tokens=ctx.batch * ctx.seq, model_flops=ctx.forward_flops(), mem=mem,
            variant=experts)
