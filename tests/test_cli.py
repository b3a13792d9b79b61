"""The `dsv3` command line, in-process (tiny models, a few steps)."""

import json
import os

import ml_dtypes
import numpy as np
import pytest

from dsv3 import ModelConfig
from dsv3.checkpoint import load_canonical, read_safetensors, save_canonical
from dsv3.cli import build_parser, generate_text, info_dict, main, train_config_from_args
from dsv3.names import canonical_shapes
from dsv3.rundir import latest_checkpoint, read_metrics
from dsv3.train_config import TrainConfig
from safetensors_fp8 import write_safetensors

TINY = ModelConfig.preset("tiny").replace(vocab_size=256, bias_update_speed=1e-2)
# The JAX training run: two layers (one dense, one MoE, plus the MTP block), every block kind, less to compile
TINY2 = TINY.replace(num_hidden_layers=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny256cli")
    TINY.save_pretrained(str(d))
    return str(d)


@pytest.fixture(scope="module")
def config2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny2cli")
    TINY2.save_pretrained(str(d))
    return str(d)


def test_train_defaults_match_train_config():
    args = build_parser().parse_args(["train"])
    t = train_config_from_args(args)
    d = TrainConfig()
    for k in ("framework", "preset", "steps", "batch_size", "seq_len", "lr", "warmup_steps", "weight_decay",
              "grad_clip", "dtype", "seed", "eps", "beta2"):
        assert getattr(t, k) == getattr(d, k), k
    assert t.out == os.path.join("runs", "small-jax")
    assert t.bias_update_speed is None  # the ModelConfig's gamma unless overridden
    t = train_config_from_args(build_parser().parse_args(["train", "--gamma", "0", "--alpha", "0.001",
                                                          "--mtp-weight", "0.1", "--framework", "torch"]))
    assert (t.bias_update_speed, t.balance_loss_alpha, t.mtp_loss_weight) == (0.0, 0.001, 0.1)


def test_info(capsys):
    assert main(["info", "--preset", "v3-671b", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert 670e9 < d["params_main"] < 672e9 and 37e9 < d["params_active_per_token"] < 38e9
    assert d["kv_cache_values_per_token"]["latent"] == 61 * 576
    assert main(["info"]) == 0
    assert "params_active_per_token" in capsys.readouterr().out
    assert info_dict(ModelConfig.preset("small"))["params_main"] == 6_552_576


def test_errors_are_short_messages(capsys, tmp_path):
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "neither a checkpoint" in err and "Traceback" not in err
    assert main(["train", "--batch-size", "6", "--grad-accum", "4", "--out", str(tmp_path / "r")]) == 2
    assert "grad_accum" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "none"), "--resume", "--framework", "torch"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def _train_args(config_dir, out, framework, *extra):
    return ["train", "--framework", framework, "--config", config_dir, "--steps", "4", "--batch-size", "8",
            "--grad-accum", "4", "--seq-len", "32", "--lr", "3e-3", "--warmup-steps", "2", "--adam-eps", "1e-3",
            "--eval-every", "2", "--eval-batches", "2", "--save-every", "2", "--out", str(out), "--no-progress",
            *extra]


@pytest.mark.slow
def test_train_jax_then_generate_in_torch_and_jax(config2_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(config2_dir, out, "jax")) == 0
    err = capsys.readouterr().err
    assert "val loss" in err and "unigram entropy" in err
    recs = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4]
    for f in ("loss.png", "expert_load.png", "train_config.json", "latest"):
        assert (out / f).exists(), f
    ckpt = latest_checkpoint(str(out))
    cfg, state = load_canonical(ckpt)  # HF layout, loadable by either framework
    assert cfg == TINY2 and cfg.vocab_size == 256 and any(np.abs(v).max() > 0 for k, v in state.items() if k.endswith("gate.bias"))
    prompt = "def main():\n    "
    t_tokens = generate_text(str(out), prompt, "torch", max_new_tokens=12, stream=False)
    j_tokens = generate_text(str(out), prompt, "jax", max_new_tokens=12, stream=False)
    assert len(t_tokens) == 12 and t_tokens == j_tokens  # trained in JAX, same greedy tokens in torch
    assert main(["generate", "--checkpoint", str(out), "--prompt", prompt, "--max-new-tokens", "12"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith(prompt) and shown[len(prompt):].rstrip("\n") == bytes(t_tokens).decode("utf-8", "replace")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(config_dir, tmp_path, capsys):
    # --lr 1e9 (the reported case): step 1's update is finite (weights ~1e9), step 2's gradient norm is not
    out = tmp_path / "nan"
    args = _train_args(config_dir, out, "torch", "--lr", "1e9", "--warmup-steps", "0",
                       "--save-every", "1", "--steps", "6")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "non-finite loss at step" in err and "last good checkpoint" in err
    ckpt = latest_checkpoint(str(out))
    step = int(err.split("non-finite loss at step ")[1].split()[0])
    assert ckpt.endswith(f"step_{step - 1:06d}")  # the step before the bad one, complete
    _, state = load_canonical(ckpt)
    assert all(np.isfinite(v).all() for v in state.values())
    # ... but its weights are what produced the non-finite values: it is not named as the good one
    assert "There is no last good checkpoint" in err and f"step_{step - 1:06d}" not in err
    assert "lower --lr (now 1e+09)" in err and "--dtype float32" not in err  # the run is already float32
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 2  # nothing intact to resume
    assert "non-finite loss" in capsys.readouterr().err
    # --lr 1e12 without clipping: the weights after step 1 already give a NaN validation loss: not saved
    out = tmp_path / "nan12"
    args = _train_args(config_dir, out, "torch", "--lr", "1e12", "--warmup-steps", "0", "--grad-clip", "0",
                       "--save-every", "1", "--steps", "6", "--dtype", "bfloat16")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "non-finite loss at step 1" in err and "There is no last good checkpoint" in err
    assert "or --dtype float32" in err and "--grad-clip" in err
    assert latest_checkpoint(str(out)) is None and not any(d.startswith("step_") for d in os.listdir(out))


def test_resume_via_cli(config_dir, tmp_path):
    out = tmp_path / "r"
    assert main(_train_args(config_dir, out, "torch", "--steps", "2")) == 0
    # only --steps given: the rest (framework, config, batch, schedule...) comes from the run's train_config.json
    assert main(["train", "--out", str(out), "--resume", "--steps", "4", "--no-progress"]) == 0
    recs = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4]
    assert main(_train_args(config_dir, out, "jax", "--resume")) == 2  # other framework's optimizer state


def _fp8_checkpoint(directory):
    cfg = ModelConfig.preset("tiny")
    rng = np.random.default_rng(0)
    state = {k: rng.standard_normal(s).astype(np.float32) * 0.02 for k, s in canonical_shapes(cfg).items()}
    save_canonical(directory, state, cfg)
    tensors = read_safetensors(os.path.join(directory, "model.safetensors"))
    from safetensors.numpy import save  # noqa: F401  (FP8 is written by hand below)

    for name in list(tensors):
        if ".self_attn." in name and name.endswith("proj.weight"):
            w = tensors[name]
            scale = np.full(((w.shape[0] + 127) // 128, (w.shape[1] + 127) // 128), np.abs(w).max() / 448,
                            np.float32)
            tensors[name] = (w / scale[0, 0]).astype(ml_dtypes.float8_e4m3fn)
            tensors[name + "_scale_inv"] = scale
    write_safetensors(os.path.join(directory, "model.safetensors"), tensors)
    conf = json.load(open(os.path.join(directory, "config.json")))
    conf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                   "weight_block_size": [128, 128]}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(conf, f)
    return cfg



def test_convert_fp8_to_bf16(tmp_path, capsys):
    src, dst = str(tmp_path / "fp8"), str(tmp_path / "bf16")
    cfg = _fp8_checkpoint(src)
    _, deq = load_canonical(src)
    assert main(["convert", "--input", src, "--output", dst, "--dtype", "bfloat16"]) == 0
    assert "wrote" in capsys.readouterr().out
    conf = json.load(open(os.path.join(dst, "config.json")))
    assert "quantization_config" not in conf
    raw = read_safetensors(os.path.join(dst, "model.safetensors"))
    assert not any(k.endswith("_scale_inv") for k in raw)
    assert raw["model.layers.0.self_attn.o_proj.weight"].dtype == ml_dtypes.bfloat16
    assert raw["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == np.float32
    got_cfg, got = load_canonical(dst)
    assert got_cfg == cfg
    for k in got:
        np.testing.assert_array_equal(np.asarray(got[k], np.float32),
                                      np.asarray(np.asarray(deq[k]).astype(ml_dtypes.bfloat16), np.float32)
                                      if not k.endswith("gate.bias") else deq[k], err_msg=k)


def test_bench_is_delegated(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    assert "bench" in capsys.readouterr().out


@pytest.mark.parametrize("framework", [pytest.param(None, marks=pytest.mark.slow), "torch"])  # None: jax, the default
def test_train_preset_tiny_trains_with_default_sequence_length(tmp_path, framework):
    """`dsv3 train --preset tiny` at the default --seq-len: byte vocabulary, enough positions (2 sequences
    a step: the batch size is not what is checked)."""
    if framework is None:
        pytest.importorskip("dsv3_jax.train")
    data = tmp_path / "corpus.txt"
    data.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(1200)))
    out = tmp_path / "run"
    argv = ["train", "--preset", "tiny", "--steps", "2", "--batch-size", "2", "--data", str(data), "--out", str(out),
            "--eval-batches", "1", "--no-progress", "--no-plots"]
    if framework:
        argv += ["--framework", framework]
    assert main(argv) == 0
    t = TrainConfig.from_dict(json.loads((out / "train_config.json").read_text()))
    assert t.preset == "tiny" and t.seq_len == TrainConfig().seq_len == 256 and t.framework == (framework or "jax")
    recs = read_metrics(str(out / "metrics.jsonl"))
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and all(np.isfinite(r["loss"]) for r in train)
    cfg, _ = load_canonical(latest_checkpoint(str(out)))
    assert cfg == ModelConfig.preset("tiny")


def test_generate_refuses_a_nan_checkpoint_instead_of_printing_nul_bytes(config_dir, tmp_path, capsys):
    rng = np.random.default_rng(0)
    state = {k: rng.standard_normal(s).astype(np.float32) * 0.02 for k, s in canonical_shapes(TINY).items()}
    state["layers.0.attn.wo.weight"][0, 0] = np.nan
    save_canonical(str(tmp_path / "w"), state, TINY)
    for framework in ("torch", "jax"):
        assert main(["generate", "--checkpoint", str(tmp_path / "w"), "--prompt", "x", "--framework", framework]) == 2
        cap = capsys.readouterr()
        assert "\x00" not in cap.out and "Traceback" not in cap.err
        assert "NaN or infinite values" in cap.err and "model.layers.0.self_attn.o_proj.weight (1 of" in cap.err
