"""The reference rows' adapter: Hugging Face transformers' DeepseekV3ForCausalLM
trained on the same weights and the same batch (no MTP, no router-bias update:
HF has neither), with eager attention and each available experts backend;
training step and prefill, and generation after a long prompt (eager experts).

Weights travel as the project's canonical state -> ``dsv3.checkpoint.save_canonical``
(HF names, per-expert tensors) in a temporary directory -> ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
import tempfile
from functools import partial

from dsv3.bench.common import BETAS, CLIP, LR, WEIGHT_DECAY
from dsv3.bench.rows import Row
from dsv3.bench.rows_torch import TorchAdapter
from dsv3.checkpoint import save_canonical

EXPERT_BACKENDS = ("eager", "grouped_mm")


def available() -> bool:
    try:
        from transformers import DeepseekV3ForCausalLM  # noqa: F401
    except Exception:  # noqa: BLE001 - optional dependency
        return False
    return True


class HFAdapter(TorchAdapter):
    framework = "hf"
    directory = None  # the HF checkpoint of the bench's weights, while scope() is open

    @contextlib.contextmanager
    def scope(self):
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except Exception:  # noqa: BLE001 - cosmetic
            pass
        with tempfile.TemporaryDirectory(prefix="dsv3-bench-hf-") as d:
            save_canonical(d, self.ctx.weights(False), self.ctx.config(False))
            self.directory = d
            try:
                yield
            finally:
                self.directory = None

    def load(self, experts: str):
        from transformers import DeepseekV3ForCausalLM

        model = DeepseekV3ForCausalLM.from_pretrained(self.directory, attn_implementation="eager",
                                                      experts_implementation=experts, dtype=self.dtype)
        return model.to(self.ctx.device)

    def train_rows(self):
        for experts in EXPERT_BACKENDS:
            yield Row(f"HF eager-attn {experts}-experts", partial(self._train_step, experts),
                      {"variant": experts, "mtp": False})

    def prefill_rows(self):
        for experts in EXPERT_BACKENDS:
            yield Row(f"HF eager-attn {experts}-experts", partial(self._forward, experts), {"variant": experts})

    def long_generator(self):
        """``generate`` (greedy, the KV cache of transformers) with eager attention and experts; exactly
        ``n`` new tokens (no EOS stop)."""
        import torch

        model = self.load("eager").eval()

        def generate(prompt, n):
            x = torch.tensor([prompt], device=self.ctx.device)
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
            return out[0, len(prompt):].tolist()

        return generate

    def _forward(self, experts: str):
        model, x = self.load(experts).eval(), self.tokens(self.ctx.inputs)
        return lambda: model(input_ids=x, use_cache=False).logits

    def _train_step(self, experts: str):
        """HF forward, the main loss as compute_loss computes it (fp32 CE, labels already shifted),
        clip, and the optimizer of dsv3_torch.train (decay on matrices only, its fused AdamW; --hf-foreach:
        torch's foreach AdamW)."""
        import torch
        import torch.nn.functional as F

        from dsv3.train_config import TrainConfig
        from dsv3_torch.train import adamw

        model = self.load(experts).train()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        decays = [p.ndim >= 2 and "norm" not in n for n, p in named]
        groups = [{"params": [p for (_, p), d in zip(named, decays) if d], "weight_decay": WEIGHT_DECAY},
                  {"params": [p for (_, p), d in zip(named, decays) if not d], "weight_decay": 0.0}]
        opt = (torch.optim.AdamW(groups, lr=LR, betas=BETAS, foreach=True) if self.ctx.args.hf_foreach
               else adamw(groups, lr=LR, betas=BETAS, eps=TrainConfig.eps))
        params = [p for _, p in named]
        x, y = self.tokens(self.ctx.inputs), self.tokens(self.ctx.labels)
        V = self.ctx.cfg.vocab_size

        def step():
            logits = model(input_ids=x, use_cache=False).logits
            loss = F.cross_entropy(logits.float().reshape(-1, V), y.reshape(-1), ignore_index=-100)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, CLIP, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        return step, "bench step: HF forward, fp32 CE, clip, AdamW"
