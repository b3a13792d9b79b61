"""tests/jax: fp32 matmuls at full precision (REFERENCE §9.2.7; a no-op on CPU, needed on GPU/TPU)."""

import jax

jax.config.update("jax_default_matmul_precision", "highest")
