import math

import pytest
import torch
import torch.nn.functional as F

import engine
from engine import sample_next
from model import GPT, GPTConfig, attention_mask, generate, load_checkpoint, save_checkpoint


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=32, **kw)
    return GPT(cfg).eval()


class FakeEnc:
    """Token t decodes to chr(ord('a') + t % 26), except 5 which is a newline."""

    def decode_single_token_bytes(self, t):
        return b"\n" if t == 5 else bytes([ord("a") + t % 26])

    def decode(self, toks):
        return b"".join(self.decode_single_token_bytes(t) for t in toks).decode()


PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kv_cache_sampling_equals_naive(temperature):
    model = tiny_model()
    runs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(123)
        runs.append(engine.generate(model, PROMPTS, 20, enc=FakeEnc(), temperature=temperature, top_p=0.9,
                                    stop=("\nd",), eot_id=3, generator=g, use_cache=use_cache))
    cached, naive = runs
    assert cached.tokens == naive.tokens
    assert cached.finish == naive.finish
    assert cached.texts == naive.texts
    for a, b in zip(cached.logprobs, naive.logprobs):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)


def test_left_padding_does_not_change_a_row():
    """A prompt sampled alone or left-padded in a batch gives the same greedy tokens and log-probs."""
    model = tiny_model()
    alone = generate(model, [PROMPTS[1]], 15, temperature=0.0)
    batched = generate(model, PROMPTS, 15, temperature=0.0)
    assert alone.tokens[0] == batched.tokens[1]
    assert torch.allclose(torch.tensor(alone.logprobs[0]), torch.tensor(batched.logprobs[1]), atol=1e-5)


def test_logprobs_equal_a_fresh_forward_pass():
    model = tiny_model()
    gen = generate(model, [PROMPTS[0]], 10, temperature=0.7, generator=torch.Generator().manual_seed(0))
    seq = torch.tensor([PROMPTS[0] + gen.tokens[0]])
    logits, _ = model(seq)
    logp = F.log_softmax(logits[0, :-1] / 0.7, -1)
    expected = logp[len(PROMPTS[0]) - 1:].gather(1, seq[0, len(PROMPTS[0]):, None]).squeeze(1)
    assert torch.allclose(torch.tensor(gen.logprobs[0]), expected, atol=1e-5)


def test_stop_string_cuts_text_and_row_stops_early():
    model = tiny_model()
    gen = generate(model, PROMPTS, 40, enc=FakeEnc(), temperature=1.0, stop=("\n",),
                   generator=torch.Generator().manual_seed(1))
    for toks, text, fin in zip(gen.tokens, gen.texts, gen.finish):
        assert "\n" not in text
        if fin == "stop":
            assert toks[-1] == 5 and 5 not in toks[:-1]
        else:
            assert fin == "length" and len(toks) == 40 and 5 not in toks


def plain_attention(q, k, v, mask):
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    att = att.masked_fill(~mask, float("-inf"))
    return att.softmax(-1) @ v


def test_sdpa_equals_plain_masked_softmax():
    torch.manual_seed(0)
    B, H, T, D = 2, 3, 7, 8
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    assert torch.allclose(F.scaled_dot_product_attention(q, k, v, is_causal=True),
                          plain_attention(q, k, v, causal), atol=1e-5)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :3] = False  # left padding on row 1
    mask = attention_mask(valid, T)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref = plain_attention(q, k, v, mask)
    assert torch.allclose(out[:, :, 3:], ref[:, :, 3:], atol=1e-5)
    assert not torch.isnan(out).any()


def test_padded_forward_matches_unpadded():
    model = tiny_model()
    seq = torch.tensor([[4, 8, 15, 16, 23, 42]])
    logits, _ = model(seq)
    padded = torch.tensor([[0, 0, 4, 8, 15, 16, 23, 42]])
    valid = padded != 0
    valid[0, :2] = False
    logits_p, _ = model(padded, valid=valid)
    assert torch.allclose(logits[0], logits_p[0, 2:], atol=1e-5)


def test_scalar_head_shapes_and_checkpoint_round_trip(tmp_path):
    lm = tiny_model()
    idx = torch.randint(0, 97, (3, 11))
    logits, loss = lm(idx, targets=idx)
    assert logits.shape == (3, 11, 97) and loss.ndim == 0
    path = tmp_path / "lm.pt"
    save_checkpoint(path, lm, tokenizer={"name": "t"}, stage="pretrain", step=5, config={"a": 1})
    rm, ckpt = load_checkpoint(path, head="scalar")
    values, _ = rm(idx)
    assert values.shape == (3, 11)
    assert ckpt["tokenizer"] == {"name": "t"} and ckpt["stage"] == "pretrain" and ckpt["step"] == 5
    # the trunk is shared: same hidden states, so the RM starts from the LM's features
    assert torch.equal(rm.transformer.h[0].attn.c_attn.weight, lm.transformer.h[0].attn.c_attn.weight)
    lm2, _ = load_checkpoint(path)
    assert torch.equal(lm2(idx)[0], logits)
    assert lm2.lm_head.weight is lm2.transformer.wte.weight  # tied after loading
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves nothing behind


def test_loglik_head_adds_the_language_models_log_likelihood(tmp_path):
    """config.loglik: output t of the scalar head = head(h_t) + log p(x_t | x_<t) under the tied
    unembedding (0 at t = 0): a reward model built from an LM checkpoint starts from its likelihood."""
    lm = tiny_model()
    idx = torch.randint(0, 97, (2, 9))
    logits, _ = lm(idx)
    logp = F.log_softmax(logits[:, :-1], -1).gather(2, idx[:, 1:, None]).squeeze(2)
    save_checkpoint(tmp_path / "lm.pt", lm, tokenizer={}, stage="sft", step=0)
    rm, _ = load_checkpoint(tmp_path / "lm.pt", head="scalar")
    plain, _ = rm(idx)
    rm.config.loglik = True
    with_ll, _ = rm(idx)
    assert torch.allclose(with_ll - plain, F.pad(logp, (1, 0)), atol=1e-5)
    with torch.no_grad():
        rm.score_head.weight.zero_()
        rm.score_head.bias.zero_()
    assert torch.allclose(rm(idx)[0][:, 1:], logp, atol=1e-5)


def test_loglik_term_at_marked_positions_equals_the_whole_sequences():
    """logits_at (score_sequences with pool="mean" marks the completion's tokens) gives the loglik
    term of the marked positions as the whole-sequence computation does, and none elsewhere."""
    rm = tiny_model(head="scalar", loglik=True)
    idx = torch.randint(0, 97, (3, 9))
    at = torch.zeros(3, 9, dtype=torch.bool)
    at[0, 3:7], at[1, 1:], at[2, 8] = True, True, True
    dense, _ = rm(idx)
    sparse, _ = rm(idx, logits_at=at)
    rm.config.loglik = False
    plain, _ = rm(idx)
    assert torch.allclose(sparse[at], dense[at], atol=1e-5)
    assert torch.allclose(sparse[~at], plain[~at], atol=1e-6)
    assert not torch.allclose(dense[at], plain[at], atol=1e-3)   # the term is there


def test_load_checkpoint_rejects_garbage(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a flywheel checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen_p = {int(sample_next(logits, 1.0, top_p=0.7, generator=g)[0]) for _ in range(200)}
    seen_k = {int(sample_next(logits, 1.0, top_k=1, generator=g)[0]) for _ in range(50)}
    assert seen_p == {0, 1} and seen_k == {0}
    tok, logp = sample_next(logits, 1.0, top_k=1, generator=g)
    assert math.isclose(float(logp), math.log(0.5), rel_tol=1e-5)  # log-prob before truncation


# ----------------------------------------------------------------------------- GPU readiness (bf16, compile)

def test_log_probs_are_fp32_and_reproducible_under_bf16_autocast():
    """Where log-probs are read (logits without targets; the RM's loglik term) the unembedding runs
    in fp32 under autocast: fp32 out, the same values from two calls (PPO's first ratio is exactly 1),
    within 0.01 nats of the fp32 model (the bf16 trunk is the only difference). The training path
    (targets given) keeps the autocast dtype."""
    lm = tiny_model()
    idx = torch.randint(0, 97, (3, 11))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, _ = lm(idx, logits_from=4)
        b, _ = lm(idx, logits_from=4)
        train_logits, loss = lm(idx, targets=idx)
    assert a.dtype == torch.float32 and torch.equal(a, b)
    assert train_logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    ratio = (F.log_softmax(a, -1) - F.log_softmax(b, -1)).exp()
    assert torch.equal(ratio, torch.ones_like(ratio))
    ref, _ = lm(idx, logits_from=4)
    assert (F.log_softmax(a, -1) - F.log_softmax(ref, -1)).abs().max() < 0.01

    rm = tiny_model(head="scalar", loglik=True)
    rm.transformer.load_state_dict(lm.transformer.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v1, _ = rm(idx, logits_from=2)
        v2, _ = rm(idx, logits_from=2)
    assert v1.dtype == torch.float32 and torch.equal(v1, v2)
    assert (v1 - rm(idx, logits_from=2)[0]).abs().max() < 0.01


def test_training_forward_is_one_graph_and_long_sequences_still_raise():
    """forward reads nothing back to the host (lengths are checked on shapes): torch.compile sees
    one graph with no break; sequences longer than block_size or the KV cache still raise."""
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 16))
    explained = torch._dynamo.explain(model)(idx, idx)
    torch._dynamo.reset()
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    with pytest.raises(ValueError, match="longer than block_size"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="longer than block_size"):
        model(torch.zeros(1, 65, dtype=torch.long), valid=torch.ones(1, 65, dtype=torch.bool))
    with pytest.raises(ValueError, match="longer than the KV cache"):
        from model import KVCache
        cache = KVCache(model.config, 1, 8, "cpu", torch.float32)
        model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="block_size"):
        generate(model, [[1] * 60], 10)


@pytest.mark.parametrize("sampler", ["plain", "fast"])
def test_kv_cache_is_in_the_autocast_dtype(monkeypatch, sampler):
    """Under bf16 autocast the keys and values come out of c_attn in bf16: the cache holds bf16 (not
    an fp32 copy), and greedy decoding gives the fp32 model's tokens on this short prompt, with
    log-probs within 0.01 nats. For model.generate and engine.generate."""
    import model as M
    module = M if sampler == "plain" else engine
    made = []

    class Recording(M.KVCache):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            made.append(self)

    monkeypatch.setattr(module, "KVCache", Recording)
    model = tiny_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = module.generate(model, PROMPTS, 10, temperature=0.0)
    assert made and all(k.dtype == torch.bfloat16 for k in made[0].k + made[0].v)
    fp32 = module.generate(model, PROMPTS, 10, temperature=0.0)
    assert made[1].k[0].dtype == torch.float32
    assert bf16.tokens == fp32.tokens
    for a, b in zip(bf16.logprobs, fp32.logprobs):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=0.01)


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                       ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12),
                                       ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12),
                                       ("NVIDIA GeForce RTX 3090", None)])
def test_peak_flops_tells_h100_variants_apart(monkeypatch, name, peak):
    from model import peak_flops
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops("cuda") == peak and peak_flops("cuda:1") == peak
    assert peak_flops("cpu") is None
