"""The full model: names, init, causality, MTP alignment, loss, errors, checkpoints, v3-671b."""

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dsv3_torch
from dsv3 import ModelConfig
from dsv3.checkpoint import CheckpointError
from dsv3.names import canonical_shapes


def _model(cfg, dtype=torch.float32):
    torch.manual_seed(0)
    return dsv3_torch.DeepSeekV3(cfg, dtype=dtype)


class _Logits:
    """Main-head logits and each MTP depth's logits, through the public steps: hidden, mtp[k], head."""

    def __init__(self, m, ids):
        h, _ = m.hidden(ids)
        self.logits, self.mtp_logits = m.head(h), []
        cos, sin = m.rope(torch.arange(ids.shape[1]), m.dtype)
        for k, mod in enumerate(m.mtp, start=1):
            nxt = torch.zeros_like(ids)
            nxt[:, : ids.shape[1] - k] = ids[:, k:]  # t_{i+k}, tail token 0
            h, _ = mod(h, m.embed(nxt), cos, sin)
            self.mtp_logits.append(m.head(mod.norm(h)))


@pytest.mark.parametrize("changes", [{}, {"q_lora_rank": None}, {"n_shared_experts": 0},
                                     {"num_nextn_predict_layers": 2}, {"num_nextn_predict_layers": 0}])
def test_state_dict_names_are_the_canonical_names(tiny, changes):
    cfg = tiny.replace(**changes)
    m = _model(cfg)
    sd = m.state_dict()
    shapes = canonical_shapes(cfg)
    assert sorted(sd) == sorted(shapes)  # the same names (state_dict order is module order, not canonical order)
    assert {k: tuple(v.shape) for k, v in sd.items()} == shapes


def test_hf_style_init(tiny):
    cfg = tiny.replace(hidden_size=128, vocab_size=512, initializer_range=0.05)
    m = _model(cfg)
    sd = m.state_dict()
    for name, t in sd.items():
        if "norm" in name:
            assert torch.equal(t, torch.ones_like(t)), name
        elif name.endswith("gate.bias"):
            assert torch.equal(t, torch.zeros_like(t)), name
        elif t.numel() >= 4096:
            assert abs(t.std().item() - 0.05) < 0.005 and abs(t.mean().item()) < 0.005, name


def _max_diff(a, b):
    return (a - b).abs().max().item()


# Changing one token changes how many rows each expert's matmul gets, and so the
# fp32 blocking of OTHER tokens' expert products: earlier positions may move by
# an ulp (~1e-7), never by a real amount. A leak moves them by ~1e-2 or more.
ULP_NOISE = 1e-6


def test_causality(tiny):
    m = _model(tiny)
    x = torch.randint(0, tiny.vocab_size, (2, 16))
    y = x.clone()
    t = 9
    y[:, t] = (y[:, t] + 1) % tiny.vocab_size
    with torch.no_grad():
        a, b = _Logits(m, x), _Logits(m, y)
    assert _max_diff(a.logits[:, :t], b.logits[:, :t]) <= ULP_NOISE
    assert _max_diff(a.logits[:, t], b.logits[:, t]) > 1e-2
    # MTP depth 1 at position i reads embed(t_{i+1}): it may change from i = t - 1 on, never before
    assert _max_diff(a.mtp_logits[0][:, : t - 1], b.mtp_logits[0][:, : t - 1]) <= ULP_NOISE
    assert _max_diff(a.mtp_logits[0][:, t - 1], b.mtp_logits[0][:, t - 1]) > 1e-2


def test_mtp_depth_two_reads_two_tokens_ahead(tiny):
    cfg = tiny.replace(num_nextn_predict_layers=2)
    m = _model(cfg)
    x = torch.randint(0, cfg.vocab_size, (1, 14))
    y = x.clone()
    t = 8
    y[:, t] = (y[:, t] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = _Logits(m, x), _Logits(m, y)
    d2a, d2b = a.mtp_logits[1], b.mtp_logits[1]
    assert _max_diff(d2a[:, : t - 2], d2b[:, : t - 2]) <= ULP_NOISE
    assert _max_diff(d2a[:, t - 2], d2b[:, t - 2]) > 1e-2


def test_mtp_loss_scores_depth_k_against_token_i_plus_k_plus_1(tiny):
    cfg = tiny.replace(num_nextn_predict_layers=2, mtp_loss_weight=0.3)
    m = _model(cfg)
    B, T = 2, 12
    stream = torch.randint(0, cfg.vocab_size, (B, T + 1))
    ids, labels = stream[:, :T], stream[:, 1:].clone()
    labels[0, 4] = -100  # an ignored target shifts into depth k's mask at position 4 - k
    with torch.no_grad():
        out = m.compute_loss(ids, labels)
        fw = _Logits(m, ids)
    for k in (1, 2):
        terms = [F.cross_entropy(fw.mtp_logits[k - 1][b, i], stream[b, i + k + 1])
                 for b in range(B) for i in range(T - k) if not (b == 0 and i + k == 4)]
        want = torch.stack(terms).mean()  # normalised by depth k's own valid count
        assert out.mtp_losses[k - 1].item() == pytest.approx(want.item(), rel=1e-6)
    main = torch.stack([F.cross_entropy(fw.logits[b, i], stream[b, i + 1])
                        for b in range(B) for i in range(T) if not (b == 0 and i == 4)]).mean()
    assert out.main_loss.item() == pytest.approx(main.item(), rel=1e-6)
    assert out.mtp_loss.item() == pytest.approx(0.3 / 2 * out.mtp_losses.sum().item(), rel=1e-6)
    total = out.main_loss + out.mtp_loss + out.balance_loss
    assert out.loss.item() == pytest.approx(total.item(), rel=1e-6)
    assert out.balance_loss.item() > 0


def test_loss_backward_reaches_every_parameter(tiny):
    m = _model(tiny)
    x = torch.randint(0, tiny.vocab_size, (2, 10))
    m.compute_loss(x, x.roll(-1, 1)).loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if not name.startswith("layers.0.ffn") and "experts.w" not in name:
            assert p.grad.abs().sum() > 0, name


def test_bad_inputs_raise_clear_errors(tiny):
    m = _model(tiny)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 128\)"):
        m(torch.tensor([[1, 128]]))
    with pytest.raises(ValueError, match="token ids"):
        m(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="max_position_embeddings=128"):
        m(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        m(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m.forward_cached(torch.zeros(1, 2, dtype=torch.long), m.init_cache(1, 128), 127)
    with pytest.raises(ValueError, match="labels"):
        m.compute_loss(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))


def test_canonical_state_round_trip_and_bf16_views(tiny):
    m = _model(tiny, torch.bfloat16)
    state = m.canonical_state()
    assert state["embed.weight"].dtype == ml_dtypes.bfloat16
    assert state["layers.1.ffn.gate.weight"].dtype == np.float32
    other = _model(tiny.replace(), torch.bfloat16)
    torch.manual_seed(1)
    other.reset_parameters()
    other.load_canonical_state(state)
    for k, v in m.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k


def test_load_canonical_state_names_missing_and_misshaped_tensors(tiny):
    m = _model(tiny)
    state = m.canonical_state()
    missing = dict(state)
    del missing["layers.2.attn.wkv_b.weight"]
    with pytest.raises(CheckpointError, match=r"missing \(1\): layers\.2\.attn\.wkv_b\.weight"):
        m.load_canonical_state(missing)
    bad = dict(state)
    bad["layers.1.ffn.experts.w2"] = np.zeros((8, 64, 31), np.float32)
    with pytest.raises(CheckpointError, match=r"layers\.1\.ffn\.experts\.w2: expected \(8, 64, 32\), got \(8, 64, 31\)"):
        m.load_canonical_state(bad)


def test_from_pretrained_reports_a_damaged_checkpoint(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file

    m = _model(tiny)
    m.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.o_proj.weight"]
    tensors["model.layers.2.mlp.gate.weight"] = tensors["model.layers.2.mlp.gate.weight"][:, :10]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        dsv3_torch.DeepSeekV3.from_pretrained(tmp_path)
    assert "layers.1.attn.wo.weight" in str(err.value) and "layers.2.ffn.gate.weight" in str(err.value)


def test_v3_671b_builds_on_meta_with_the_published_parameter_count():
    cfg = ModelConfig.preset("v3-671b")
    m = dsv3_torch.DeepSeekV3(cfg, dtype=torch.bfloat16, device=torch.device("meta"))
    assert all(p.is_meta for p in m.parameters())
    assert set(m.state_dict()) == set(canonical_shapes(cfg))
    main = sum(p.numel() for n, p in m.named_parameters() if not n.startswith("mtp."))
    main_bias = sum(b.numel() for n, b in m.named_buffers() if not n.startswith("mtp."))
    assert main_bias == 58 * 256
    # the published count (docs/reference.md §1) includes the 58 e_score_correction_bias vectors
    assert main + main_bias == 671_026_419_200
    mtp = sum(p.numel() for p in m.mtp.parameters())
    D, E, F_, V = 7168, 256, 2048, 129280
    attn = D * 1536 + 1536 + 1536 * 128 * 192 + D * 576 + 512 + 512 * 128 * 256 + 128 * 128 * D
    moe_layer = attn + 2 * D + E * D + 3 * E * F_ * D + 3 * F_ * D
    assert mtp == 3 * D + 2 * D * D + moe_layer == 11_610_067_968  # ~11.5B unique (embed/head shared)
    # the released checkpoint also stores the MTP layer's own embed and head copies:
    # 684,489,845,504 tensor' values (published as "685B")
    assert main + main_bias + mtp + 256 + 2 * V * D == 684_489_845_504
