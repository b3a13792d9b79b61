"""Sampling, generation and AdamW arguments: ONE check (dsv3.generation, dsv3.train_config) refuses bad
values with the same message in PyTorch and JAX; NaN logits stop generation with an error."""

import math

import numpy as np
import pytest

from dsv3 import ModelConfig
from dsv3.generation import NonFiniteLogits
from dsv3.train_config import TrainConfig

# The 2-layer tiny model of tests/jax (test_model.py, test_padding.py): with batches of 3 prompts of at most 7
# tokens, JAX generation here runs the prefill and decode programs those tests compile (prefill bucket 8, cache 32).
CFG = ModelConfig.preset("tiny").replace(num_hidden_layers=2)
V = CFG.vocab_size
FRAMEWORKS = ("torch", "jax")

# the xdist worker of tests/jax/test_model.py and friends, which compile the same generation programs
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.xdist_group("jax_tiny_2layer")]


@pytest.fixture(scope="module")
def models():
    import torch
    from flax import nnx

    import dsv3_jax
    import dsv3_torch

    torch.manual_seed(0)
    tm = dsv3_torch.DeepSeekV3(CFG)
    tm.eval()
    jm = dsv3_jax.DeepSeekV3(CFG, rngs=nnx.Rngs(0))
    jm.load_canonical_state(tm.canonical_state())
    return {"torch": tm, "jax": jm}


def _generate(framework):
    if framework == "torch":
        from dsv3_torch import generate
    else:
        from dsv3_jax import generate
    return generate


def _sample_next(framework):
    if framework == "torch":
        import torch

        from dsv3_torch.generate import sample_next

        return lambda **kw: sample_next(torch.zeros(1, V), generator=torch.Generator(), **kw)
    import jax
    import jax.numpy as jnp

    from dsv3_jax.generate import sample_next

    return lambda **kw: sample_next(jnp.zeros((1, V)), jax.random.key(0), **kw)


GOOD = dict(prompts=[[1, 2, 3]], max_new_tokens=2)
BAD_GENERATE = [
    (dict(temperature=math.nan), r"generate: temperature: must be a finite number >= 0 \(got nan\)"),
    (dict(temperature=math.inf), r"generate: temperature: must be a finite number >= 0 \(got inf\)"),
    (dict(temperature=-0.5), r"generate: temperature: must be a finite number >= 0 \(got -0\.5\)"),
    (dict(temperature="1"), r"generate: temperature: must be a finite number >= 0 \(got '1'\)"),
    (dict(temperature=1.0, top_k=0), r"generate: top_k: must be None \(null\) or a positive integer \(got 0\)"),
    (dict(temperature=1.0, top_k=-3), r"generate: top_k: must be None \(null\) or a positive integer \(got -3\)"),
    (dict(temperature=1.0, top_k=2.0), r"generate: top_k: must be None \(null\) or a positive integer \(got 2\.0\)"),
    (dict(temperature=1.0, top_k=True), r"generate: top_k: .* \(got True\)"),
    (dict(temperature=1.0, top_p=0.0), r"generate: top_p: must be None \(null\) or a finite number in \(0, 1\] "
                                       r"\(got 0\.0\)"),
    (dict(temperature=1.0, top_p=-0.1), r"generate: top_p: .*in \(0, 1\] \(got -0\.1\)"),
    (dict(temperature=1.0, top_p=1.5), r"generate: top_p: .*in \(0, 1\] \(got 1\.5\)"),
    (dict(temperature=1.0, top_p=math.nan), r"generate: top_p: .*in \(0, 1\] \(got nan\)"),
    (dict(max_new_tokens=-1), r"generate: max_new_tokens: must be a non-negative integer \(got -1\)"),
    (dict(max_new_tokens=2.0), r"generate: max_new_tokens: must be a non-negative integer \(got 2\.0\)"),
    (dict(seed=1.5), r"generate: seed: must be an integer \(got 1\.5\)"),
    (dict(eos=V), rf"generate: eos: must lie in \[0, vocab_size={V}\) \(got {V}\)"),
    (dict(eos=-1), r"generate: eos: must be None \(null\) or a non-negative integer \(got -1\)"),
    (dict(prompts=[[1.0, 2.0]]), r"generate: prompts\[0\]: token ids must be integers \(got 1\.0 of type float\)"),
    (dict(prompts=[[1, 2], [3, 2.7]]), r"generate: prompts\[1\]: token ids must be integers \(got 2\.7"),
    (dict(prompts=[[True, 2]]), r"generate: prompts\[0\]: token ids must be integers \(got True of type bool\)"),
    (dict(prompts=[[1, np.True_]]), r"generate: prompts\[0\]: token ids must be integers \(got (np\.)?True"),
    (dict(prompts=np.ones((1, 3), np.float32)), r"generate: prompts\[0\]: token ids must be integers .*float32"),
    (dict(prompts=[[1, V]]), rf"generate: prompts\[0\]: token ids must lie in \[0, {V}\) \(got min 1, max {V}\)"),
    (dict(prompts=[[-1, 2]]), rf"generate: prompts\[0\]: token ids must lie in \[0, {V}\)"),
    (dict(prompts=[]), r"generate: prompts: must be a non-empty list of prompts"),
    (dict(prompts=[[1], []]), r"generate: prompts\[1\]: must be a non-empty prompt"),
    (dict(prompts="abc"), r"generate: prompts: must be a non-empty list of prompts"),
    (dict(prompts=["abc"]), r"generate: prompts\[0\]: must be a non-empty prompt"),
]


@pytest.mark.parametrize("change, message", BAD_GENERATE, ids=[str(c) for c, _ in BAD_GENERATE])
def test_bad_generate_arguments_same_error_in_both_frameworks(models, change, message):
    seen = {}
    for fw in FRAMEWORKS:
        with pytest.raises(ValueError, match=message) as err:
            _generate(fw)(models[fw], **{**GOOD, **change})
        seen[fw] = str(err.value)
    assert seen["torch"] == seen["jax"]


BAD_SAMPLING = [(c, m) for c, m in BAD_GENERATE if set(c) <= {"temperature", "top_k", "top_p"}]


@pytest.mark.parametrize("change, message", BAD_SAMPLING, ids=[str(c) for c, _ in BAD_SAMPLING])
def test_sample_next_refuses_the_same_values(change, message):
    seen = {}
    for fw in FRAMEWORKS:
        with pytest.raises(ValueError, match=message) as err:
            _sample_next(fw)(**{"temperature": 1.0, "top_k": None, "top_p": None, **change})
        seen[fw] = str(err.value)
    assert seen["torch"] == seen["jax"]


def test_valid_edge_values_generate_in_both_frameworks(models):
    """Integer ids of numpy types, top_p=1, top_k beyond the vocabulary, zero new tokens, eos=None."""
    prompts = [np.array([1, 2, 3], np.int64), [np.int32(4), 5], [np.uint8(6)]]
    out = {}
    for fw in FRAMEWORKS:
        gen = _generate(fw)
        assert gen(models[fw], prompts, 0) == [[], [], []]
        out[fw] = gen(models[fw], prompts, 3, temperature=0.0, top_k=10 * V, top_p=1.0)
        assert [len(r) for r in out[fw]] == [3, 3, 3]
        # top_k=1 and a tiny top_p keep only the argmax: the sampled tokens are the greedy ones
        assert gen(models[fw], prompts, 3, temperature=0.5, top_k=1, top_p=1e-6, seed=-3) == out[fw]
    assert out["torch"] == out["jax"]


def test_nan_logits_stop_generation_in_both_frameworks(models):
    """A NaN in the embedding of token 7 poisons only the rows whose prompt contains it."""
    from flax import nnx

    import dsv3_jax
    import dsv3_torch

    state = {k: np.array(v) for k, v in models["torch"].canonical_state().items()}
    state["embed.weight"][7] = np.nan
    tm = dsv3_torch.DeepSeekV3(CFG)
    tm.load_canonical_state(state)
    tm.eval()
    jm = dsv3_jax.DeepSeekV3(CFG, rngs=nnx.Rngs(0))
    jm.load_canonical_state(state)
    seen = {}
    for fw, m in (("torch", tm), ("jax", jm)):
        with pytest.raises(NonFiniteLogits, match=r"NaN or infinite logits at position 2 for prompt rows \[1\]") as err:
            _generate(fw)(m, [[1, 2, 3], [4, 5, 7], [8]], 4, temperature=1.0, top_p=0.5)
        seen[fw] = str(err.value)
        clean = [[1, 2, 3], [4, 5, 6], [8]]  # rows without token 7 still generate, as with the clean weights
        assert _generate(fw)(m, clean, 2, temperature=1.0, top_p=0.5) == \
            _generate(fw)(models[fw], clean, 2, temperature=1.0, top_p=0.5)
    assert seen["torch"] == seen["jax"]


BAD_OPTIMIZER = [
    (dict(beta1=1.5), r"TrainConfig\.beta1: must be a finite number in \[0, 1\) \(got 1\.5\)"),
    (dict(beta1=1.0), r"TrainConfig\.beta1: must be a finite number in \[0, 1\) \(got 1\.0\)"),
    (dict(beta2=-0.1), r"TrainConfig\.beta2: must be a finite number in \[0, 1\) \(got -0\.1\)"),
    (dict(beta2=math.nan), r"TrainConfig\.beta2: must be a finite number in \[0, 1\) \(got nan\)"),
    (dict(eps=-1e-8), r"TrainConfig\.eps: must be a finite number > 0 \(got -1e-08\)"),
    (dict(eps=0.0), r"TrainConfig\.eps: must be a finite number > 0 \(got 0\.0\)"),
    (dict(lr=0.0), r"TrainConfig\.lr: must be a finite number > 0 \(got 0\.0\)"),
    (dict(lr=math.inf), r"TrainConfig\.lr: must be a finite number > 0 \(got inf\)"),
    (dict(lr=math.nan), r"TrainConfig\.lr: must be a finite number > 0 \(got nan\)"),
    (dict(weight_decay=-0.1), r"TrainConfig\.weight_decay: must be a finite number >= 0 \(got -0\.1\)"),
    (dict(grad_clip=-1.0), r"TrainConfig\.grad_clip: must be a finite number >= 0 \(got -1\.0\)"),
    (dict(grad_clip=math.nan), r"TrainConfig\.grad_clip: must be a finite number >= 0 \(got nan\)"),
    (dict(min_lr_ratio=1.5), r"TrainConfig\.min_lr_ratio: must be a finite number in \[0, 1\] \(got 1\.5\)"),
    (dict(warmup_steps=-1), r"TrainConfig\.warmup_steps: must be a non-negative integer \(got -1\)"),
    (dict(bias_update_speed=-0.01), r"TrainConfig\.bias_update_speed: must be None \(null\) or a finite number "
                                    r">= 0 \(got -0\.01\)"),
    (dict(balance_loss_alpha=math.inf), r"TrainConfig\.balance_loss_alpha: .* \(got inf\)"),
    (dict(mtp_loss_weight="0.3"), r"TrainConfig\.mtp_loss_weight: .* \(got '0\.3'\)"),
]


@pytest.mark.parametrize("change, message", BAD_OPTIMIZER, ids=[str(c) for c, _ in BAD_OPTIMIZER])
def test_bad_optimizer_settings_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**change)


@pytest.mark.parametrize("change", [dict(beta1=1.5), dict(eps=-1e-8), dict(lr=math.nan), dict(grad_clip=-1.0)])
def test_both_backends_refuse_bad_optimizer_settings_alike(change):
    """TrainConfig refuses them; a config changed after that is refused again by each framework's optimizer."""
    from dsv3_jax.train import JaxBackend
    from dsv3_torch.train import TorchBackend

    seen = {}
    for fw, backend in (("torch", TorchBackend), ("jax", JaxBackend)):
        tcfg = TrainConfig(framework=fw, preset="tiny", seq_len=16)
        setattr(tcfg, *next(iter(change.items())))
        with pytest.raises(ValueError, match=rf"TrainConfig\.{next(iter(change))}: must be") as err:
            backend(CFG, tcfg)
        seen[fw] = str(err.value)
    assert seen["torch"] == seen["jax"]


def test_cli_reports_bad_arguments_without_traceback(tmp_path, capsys):
    from dsv3.cli import main

    for argv, msg in ((["train", "--framework", "jax", "--beta1", "1.5"], "TrainConfig.beta1: must be a finite number in [0, 1)"),
                      (["train", "--framework", "jax", "--adam-eps=-1e-8"], "TrainConfig.eps: must be a finite number > 0"),
                      (["train", "--framework", "torch", "--beta1", "1.5"], "TrainConfig.beta1: must be a finite number in [0, 1)")):
        assert main([*argv, "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err
