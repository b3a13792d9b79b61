"""Decoding on the latent (absorbed) and naive caches reproduces the full forward (docs/reference.md §2.1)."""

import pytest
import torch

import dsv3_torch
from dsv3 import ModelConfig

TOL = 1e-5


def _model(cfg=None, dtype=torch.float32):
    cfg = cfg or ModelConfig.preset("tiny")
    torch.manual_seed(0)
    m = dsv3_torch.DeepSeekV3(cfg, dtype=dtype)
    with torch.no_grad():
        for r in m.routers():
            r.bias.uniform_(0, 0.3)
        # larger than init-scale weights so attention is far from uniform
        for layer in m.layers:
            layer.attn.wkv_b.weight.mul_(20)
            layer.attn.wq_b.weight.mul_(20)
    return m


@pytest.mark.parametrize("kind", ["latent", "naive"])
def test_token_by_token_matches_full_forward(kind):
    m = _model()
    x = torch.randint(0, m.cfg.vocab_size, (2, 20))
    with torch.no_grad():
        full = m(x)
        cache = m.init_cache(2, 24, kind=kind)
        steps = [m.forward_cached(x[:, t:t + 1], cache, t)[0] for t in range(x.shape[1])]
    err = (torch.cat(steps, 1) - full).abs().max().item()
    assert err <= TOL, f"{kind}: {err:.3g}"


@pytest.mark.parametrize("kind", ["latent", "naive"])
def test_chunks_extend_a_non_empty_cache(kind):
    m = _model()
    x = torch.randint(0, m.cfg.vocab_size, (3, 19))
    with torch.no_grad():
        full = m(x)
        cache = m.init_cache(3, 19, kind=kind)
        outs, pos = [], 0
        for n in (5, 1, 7, 6):  # multi-token chunks after the first need the absolute-position mask
            outs.append(m.forward_cached(x[:, pos:pos + n], cache, pos)[0])
            pos += n
    err = (torch.cat(outs, 1) - full).abs().max().item()
    assert err <= TOL, f"{kind}: {err:.3g}"


@pytest.mark.parametrize("kind", ["latent", "naive"])
def test_prefill_sized_chunks_attend_like_training(kind):
    """A cached call of at least 17 queries (tiny's head shapes: dsv3.flops.expand_latent_keys) attends on
    keys expanded from the cache with the fused kernel, from position 0 (causal) and after a non-empty cache
    (the absolute-position mask); shorter calls stay absorbed. Both give the full forward's logits."""
    from dsv3.flops import expand_latent_keys

    m = _model()
    assert expand_latent_keys(m.cfg, 17) and not expand_latent_keys(m.cfg, 16)
    x = torch.randint(0, m.cfg.vocab_size, (2, 41))
    with torch.no_grad():
        full = m(x)
        cache = m.init_cache(2, 41, kind=kind)
        outs, pos = [], 0
        for n in (20, 1, 3, 17):
            outs.append(m.forward_cached(x[:, pos:pos + n], cache, pos)[0])
            pos += n
    err = (torch.cat(outs, 1) - full).abs().max().item()
    assert err <= TOL, f"{kind}: {err:.3g}"


def test_latent_cache_holds_only_normalised_latent_and_rotated_rope_key():
    m = _model()
    cfg = m.cfg
    cache = m.init_cache(1, 8, kind="latent")
    assert [sorted(lc) for lc in cache.layers] == [["c_kv", "k_pe"]] * cfg.num_hidden_layers
    assert cache.layers[0]["c_kv"].shape == (1, 8, cfg.kv_lora_rank)
    assert cache.layers[0]["k_pe"].shape == (1, 8, cfg.qk_rope_head_dim)
    x = torch.randint(0, cfg.vocab_size, (1, 5))
    with torch.no_grad():
        m.forward_cached(x, cache, 0)
        h = m.layers[0].attn_norm(m.embed(x))
        cos, sin = m.rope(torch.arange(5), torch.float32)
        c_kv, k_pe = m.layers[0].attn.latent(h, cos, sin)
    torch.testing.assert_close(cache.layers[0]["c_kv"][:, :5], c_kv, rtol=0, atol=0)
    torch.testing.assert_close(cache.layers[0]["k_pe"][:, :5], k_pe, rtol=0, atol=0)
    assert cache.layers[0]["c_kv"][:, 5:].abs().sum() == 0


def test_bf16_attends_in_causal_query_blocks(monkeypatch):
    """With 4-query blocks (dsv3.flops.CAUSAL_QUERY_BLOCK = 4), the bf16 path's attention (explicit matmuls)
    of a 20-token forward, and of a 17-token prefill after 3 cached tokens, runs block by block, block j on
    the keys up to its own last position; both give the one-block logits bit for bit, and the same
    gradients to bf16 rounding."""
    import dsv3.flops
    import dsv3_torch.mla as mla

    m = _model(dtype=torch.bfloat16)
    x = torch.randint(0, m.cfg.vocab_size, (2, 20))
    params = list(m.layers.parameters())

    def run():
        full = m(x)
        grads = torch.autograd.grad(full.float().square().mean(), params)
        with torch.no_grad():
            cache = m.init_cache(2, 24, kind="latent")
            m.forward_cached(x[:, :3], cache, 0)  # 3 queries: absorbed, no blocks
            tail = m.forward_cached(x[:, 3:], cache, 3)[0]  # 17: a prefill on expanded keys (expand_latent_keys)
        return full, grads, tail

    one_block = run()
    keys, attend = [], mla.MLA.attend
    monkeypatch.setattr(dsv3.flops, "CAUSAL_QUERY_BLOCK", 4)
    monkeypatch.setattr(mla.MLA, "attend", lambda self, q, k, v, mask: (keys.append(k.shape[2]),
                                                                        attend(self, q, k, v, mask))[1])
    blocked = run()
    L = m.cfg.num_hidden_layers
    assert keys == [4, 8, 12, 16, 20] * L + [3 + 4, 3 + 8, 3 + 12, 3 + 16, 3 + 17] * L
    assert torch.equal(blocked[0], one_block[0]) and torch.equal(blocked[2], one_block[2])
    for g, ref in zip(blocked[1], one_block[1]):
        # the blocks sum k's and v's gradients in another order: bf16 rounding (eps 2^-8 = 3.9e-3), measured
        # at most 0.0093 of the norm here
        assert ((g.float() - ref.float()).norm() / ref.float().norm()).item() < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_masked_softmax_adds_the_mask_with_a_fills_values_and_gradients(dtype):
    """masked_softmax adds a 0 / -inf bias instead of filling -inf: probabilities and score gradients
    equal the fill's bit for bit, for a causal [S, T] mask after cached keys and a per-row [B, 1, S, T]
    padding mask, and masked keys get probability 0 and gradient 0."""
    from dsv3_torch.mla import causal_mask, masked_softmax

    torch.manual_seed(5)
    S, T = 6, 9
    row_mask = causal_mask(T - S, S, T, "cpu") & (torch.rand(2, 1, 1, T) > 0.3)
    row_mask[..., torch.arange(S), T - S + torch.arange(S)] = True  # a query always sees itself
    for mask in (causal_mask(T - S, S, T, "cpu"), row_mask):
        scores = (torch.randn(2, 3, S, T) * 4).to(dtype).requires_grad_()
        dp = torch.randn(2, 3, S, T).to(dtype)
        p = masked_softmax(scores, mask, dtype)
        (g,) = torch.autograd.grad(p, scores, dp)
        ref = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1, dtype=torch.float32).to(dtype)
        (g_ref,) = torch.autograd.grad(ref, scores, dp)
        assert p.dtype == dtype and torch.equal(p, ref) and torch.equal(g, g_ref)
        hidden = ~mask.expand_as(p)
        assert (p[hidden] == 0).all() and (g[hidden] == 0).all()


def test_latent_and_naive_agree_in_bf16():
    m = _model(dtype=torch.bfloat16)
    x = torch.randint(0, m.cfg.vocab_size, (2, 12))
    with torch.no_grad():
        full = m(x).float()
        outs = {}
        for kind in ("latent", "naive"):
            cache = m.init_cache(2, 12, kind=kind)
            outs[kind] = torch.cat([m.forward_cached(x[:, t:t + 1], cache, t)[0] for t in range(12)], 1).float()
    assert torch.equal(outs["naive"], full)  # same ops in the same order as the full forward
    assert (outs["latent"] - full).abs().max().item() < 5e-2


def test_cache_overflow_and_bad_kind_raise():
    m = _model()
    cache = m.init_cache(1, 4)
    with pytest.raises(ValueError, match="do not fit"):
        m.forward_cached(torch.zeros(1, 3, dtype=torch.long), cache, 2)
    with pytest.raises(ValueError, match="latent"):
        m.init_cache(1, 4, kind="paged")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m.init_cache(1, m.cfg.max_position_embeddings + 1)
    with pytest.raises(ValueError, match="batch size 2 does not match the cache's 1"):
        m.forward_cached(torch.zeros(2, 1, dtype=torch.long), cache, 0)
    with pytest.raises(ValueError, match="empty prompt"):
        dsv3_torch.generate(m, [[1], []], 3)
    assert dsv3_torch.generate(m, [[1, 2]], 0) == [[]]


def _greedy_reference(m, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("kind", ["latent", "naive"])
def test_generate_greedy_matches_full_forward_with_ragged_prompts(kind):
    m = _model()
    prompts = [[3, 14, 15, 92, 65], [35, 89], [79, 32, 38]]
    streamed = []
    got = dsv3_torch.generate(m, prompts, max_new_tokens=6, cache=kind,
                              on_token=lambda b, t: streamed.append((b, t)))
    want = [_greedy_reference(m, p, 6) for p in prompts]
    assert got == want
    assert sorted(streamed) == sorted((b, t) for b, toks in enumerate(got) for t in toks)


def test_generate_stops_after_eos_and_sampling_is_seeded():
    m = _model()
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    greedy = dsv3_torch.generate(m, prompts, max_new_tokens=5)
    eos = greedy[0][1]
    cut = dsv3_torch.generate(m, prompts, max_new_tokens=5, eos=eos)
    assert cut[0] == greedy[0][:2]
    assert all(len(c) <= 5 for c in cut)
    a = dsv3_torch.generate(m, prompts, 8, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    b = dsv3_torch.generate(m, prompts, 8, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    assert a == b and all(0 <= t < m.cfg.vocab_size for row in a for t in row)
    # top_k=1 sampling is greedy
    assert dsv3_torch.generate(m, prompts, 5, temperature=1.0, top_k=1, seed=3) == greedy
