"""tests/jax: XLA numerics pinned before jax is imported.

- ``--xla_allow_excess_precision=false``: XLA:CPU otherwise keeps fused bf16 intermediates in
  fp32 (REFERENCE §9.1), which moves bf16 logits away from HF's op-by-op rounding.
- fp32 matmuls at full precision (REFERENCE §9.2.7; a no-op on CPU, needed on GPU/TPU).
"""

import os
import sys

if "jax" not in sys.modules and "xla_allow_excess_precision" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
