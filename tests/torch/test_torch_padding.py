"""attention_mask (1 = real token, 0 = padding) in the forward, the loss, the router counts and generation;
the router stays fp32 under model.to(bfloat16)."""

import pytest
import torch

import dsv3_torch
from dsv3 import ModelConfig

PAD = 7  # any id: padded tokens must not matter


def _model(dtype=torch.float32):
    cfg = ModelConfig.preset("tiny")
    torch.manual_seed(0)
    m = dsv3_torch.DeepSeekV3(cfg, dtype=dtype)
    with torch.no_grad():
        for r in m.routers():
            r.bias.uniform_(0, 0.3)
        for layer in m.layers:  # far from uniform attention, so a leak through a padded key shows
            layer.attn.wkv_b.weight.mul_(20)
            layer.attn.wq_b.weight.mul_(20)
    return m


def _pad(rows, side):
    """rows of ids -> (tokens [B, L], attention_mask [B, L]) padded on `side` with PAD."""
    L = max(map(len, rows))
    toks, mask = [], []
    for r in rows:
        p = L - len(r)
        toks.append([PAD] * p + r if side == "left" else r + [PAD] * p)
        mask.append([0] * p + [1] * len(r) if side == "left" else [1] * len(r) + [0] * p)
    return torch.tensor(toks), torch.tensor(mask)


def _rows(m, lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, m.cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_logits_equal_each_row_alone(side):
    m = _model()
    rows = _rows(m, [9, 5, 2])
    tokens, mask = _pad(rows, side)
    with torch.no_grad():
        out = m(tokens, attention_mask=mask)
        assert torch.isfinite(out).all()  # padded rows too (a fully padded query row sees itself)
        for b, r in enumerate(rows):
            alone = m(torch.tensor([r]))[0]
            got = out[b][mask[b].bool()]
            torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)


def test_no_mask_and_all_ones_mask_agree_and_none_is_the_old_path():
    m = _model()
    x = torch.randint(0, m.cfg.vocab_size, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(m(x, attention_mask=torch.ones_like(x)), m(x), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="attention_mask"):
        m(x, attention_mask=torch.ones(2, 9))


def _loss_alone(m, rows):
    """The loss terms of a batch of rows of different lengths from the rows computed alone:
    CE terms token-weighted (mean over the batch's labels), the balance loss a mean over sequences."""
    parts = []
    for r in rows:
        x = torch.tensor([r])
        parts.append((m.compute_loss(x, x), len(r)))
    n_mtp = m.cfg.num_nextn_predict_layers
    main = sum(o.main_loss * n for o, n in parts) / sum(n for _, n in parts)
    mtp = [sum(o.mtp_losses[k] * max(n - k - 1, 0) for o, n in parts) / sum(max(n - k - 1, 0) for _, n in parts)
           for k in range(n_mtp)]
    bal = sum(o.balance_loss for o, _ in parts) / len(parts)
    counts = sum(o.counts for o, _ in parts)
    return main, torch.stack(mtp), bal, counts


@pytest.mark.parametrize("side", ["left", "right"])
def test_masked_loss_equals_unpadded_loss(side):
    m = _model()
    rows = _rows(m, [12, 7, 4], seed=2)
    tokens, mask = _pad(rows, side)
    labels = tokens.clone()  # the pad labels are NOT -100: the mask alone must drop them
    with torch.no_grad():
        out = m.compute_loss(tokens, labels, attention_mask=mask)
        # the labels are the inputs (no shift): main CE scores every real position, MTP depth k the
        # positions whose t_{i+k} is real; the same as the rows alone
        main, mtp, bal, counts = _loss_alone(m, rows)
    assert torch.isfinite(out.loss)
    assert abs(out.main_loss.item() - main.item()) <= 1e-6
    torch.testing.assert_close(out.mtp_losses, mtp, rtol=0, atol=1e-6)
    assert abs(out.balance_loss.item() - bal.item()) <= 1e-6
    assert torch.equal(out.counts, counts)  # router counts: the real tokens only, exactly


def test_single_padded_row_loss_equals_unpadded_loss():
    m = _model()
    (r,) = _rows(m, [10], seed=3)
    x = torch.tensor([r])
    with torch.no_grad():
        ref = m.compute_loss(x, x)
        for side in ("left", "right"):
            tokens, mask = _pad([r, r + r[:4]], side)
            tokens, mask = tokens[:1], mask[:1]
            out = m.compute_loss(tokens, tokens, attention_mask=mask)
            for a, b in zip(out, ref):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
            assert torch.equal(out.counts, ref.counts)


def test_router_counts_with_padding_equal_the_real_tokens_alone():
    m = _model()
    rows = _rows(m, [11, 3], seed=4)
    tokens, mask = _pad(rows, "left")
    with torch.no_grad():
        _, moe = m.hidden(tokens, attention_mask=mask)
        alone = [m.hidden(torch.tensor([r]))[1] for r in rows]  # per row: one MoEOutput per MoE layer
    assert len(moe) == len(alone[0]) > 0
    for i, o in enumerate(moe):
        assert torch.equal(o.counts, sum(a[i].counts for a in alone))


def test_padded_tokens_get_no_gradient_path_to_the_loss():
    m = _model()
    rows = _rows(m, [8, 5], seed=5)
    tokens, mask = _pad(rows, "left")
    emb = m.embed.weight
    out = m.compute_loss(tokens, tokens, attention_mask=mask)
    out.loss.backward()
    assert torch.isfinite(emb.grad).all()
    # PAD occurs only at padded positions here: its embedding row gets no gradient
    if all(PAD not in r for r in rows):
        assert emb.grad[PAD].abs().max().item() == 0.0


@pytest.mark.parametrize("kind", ["latent", "naive"])
def test_left_padded_batched_greedy_generation_equals_each_prompt_alone(kind):
    m = _model()
    prompts = _rows(m, [1, 6, 3, 9, 2], seed=6)
    got = dsv3_torch.generate(m, prompts, max_new_tokens=6, cache=kind)
    for p, g in zip(prompts, got):
        assert g == dsv3_torch.generate(m, [p], max_new_tokens=6, cache=kind)[0]


def test_cached_prefill_with_mask_then_steps_equal_the_full_padded_forward():
    m = _model()
    rows = _rows(m, [8, 3], seed=7)
    tokens, mask = _pad(rows, "left")
    with torch.no_grad():
        cache = m.init_cache(2, 12)
        a, _ = m.forward_cached(tokens[:, :5], cache, 0, attention_mask=mask[:, :5])
        b, _ = m.forward_cached(tokens[:, 5:], cache, 5, attention_mask=mask[:, 5:])
        full = m(tokens, attention_mask=mask)
        got = torch.cat([a, b], 1)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], full[keep], rtol=0, atol=1e-5)
    assert torch.equal(cache.mask[:, :8], keep)


def test_to_bfloat16_keeps_the_router_in_fp32():
    m = _model().to(torch.bfloat16)
    assert m.embed.weight.dtype == torch.bfloat16
    for r in m.routers():
        assert r.weight.dtype == torch.float32 and r.bias.dtype == torch.float32
    m = m.half().bfloat16().to(device="cpu")
    assert all(r.weight.dtype == torch.float32 and r.bias.dtype == torch.float32 for r in m.routers())
    assert m.state_dict()["layers.1.ffn.gate.weight"].dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(m(torch.randint(0, m.cfg.vocab_size, (1, 6))).float()).all()
