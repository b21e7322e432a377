import dataclasses
import inspect
import json
import math

import pytest
import torch
import torch.nn.functional as F

import common
import ppo
import tokenizer
from model import GPT, GPTConfig, load_checkpoint, save_checkpoint
from conftest import make_code_dir

# ----------------------------------------------------------------------------- the pure functions


def test_gae_hand_worked_three_steps():
    # gamma = 1, lambda = 0.5; row 0 has 3 real tokens, row 1 has 2 (its third column is padding,
    # filled with garbage that must be ignored).
    rewards = torch.tensor([[-0.1, 0.0, 1.0], [0.2, 0.5, 9.0]])
    values = torch.tensor([[0.5, 0.2, -0.1], [0.3, 0.4, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0, backwards (V after the last token is 0):
    #   delta_2 = 1.0 + 0 - (-0.1) = 1.1                    A_2 = 1.1
    #   delta_1 = 0.0 + (-0.1) - 0.2 = -0.3                 A_1 = -0.3 + 0.5 * 1.1 = 0.25
    #   delta_0 = -0.1 + 0.2 - 0.5 = -0.4                   A_0 = -0.4 + 0.5 * 0.25 = -0.275
    #   returns = A + V = [0.225, 0.45, 1.0]
    # row 1 (2 tokens): delta_1 = 0.5 + 0 - 0.4 = 0.1       A_1 = 0.1
    #                   delta_0 = 0.2 + 0.4 - 0.3 = 0.3     A_0 = 0.3 + 0.5 * 0.1 = 0.35
    #   returns = [0.65, 0.5], padding 0
    assert torch.allclose(adv, torch.tensor([[-0.275, 0.25, 1.1], [0.35, 0.1, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[0.225, 0.45, 1.0], [0.65, 0.5, 0.0]]))


def test_gae_with_lambda_one_is_reward_to_go_minus_value():
    rewards, values = torch.randn(4, 6), torch.randn(4, 6)
    mask = torch.ones(4, 6)
    adv, ret = ppo.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = rewards.flip(1).cumsum(1).flip(1)
    assert torch.allclose(ret, to_go, atol=1e-5)
    assert torch.allclose(adv, to_go - values, atol=1e-5)


def test_shaped_rewards_hand_example():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]])
    ref_logp = torch.tensor([[-1.5, -1.0, -0.5], [-0.5, -0.2, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    score = torch.tensor([2.0, 0.5])
    no_stop = torch.tensor([False, True])
    rewards, kl = ppo.shaped_rewards(logp, ref_logp, score, no_stop, mask, kl_coef=0.1, no_stop_penalty=1.0)
    # row 0: kl = [0.5, -1.0, 0.0]; rewards = -0.1 * kl, plus the score 2.0 at the last token
    # row 1: kl = [0.2, -0.5]; the last (2nd) token gets 0.05 + 0.5 - 1.0 (never stopped)
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0], [0.2, -0.5, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1, 2.0], [-0.02, 0.05 + 0.5 - 1.0, 0.0]]))


def test_shaped_rewards_with_the_score_split_over_tokens():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]])
    ref_logp = torch.tensor([[-1.5, -1.0, -0.5], [-0.5, -0.2, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    score = torch.tensor([2.0, 0.5])
    no_stop = torch.tensor([False, True])
    split = torch.tensor([[0.3, 0.4, 0.5], [0.1, 0.2, 7.0]])  # row 1's third column is padding
    rewards, kl = ppo.shaped_rewards(logp, ref_logp, score, no_stop, mask, kl_coef=0.1, no_stop_penalty=1.0,
                                     score_tokens=split)
    # row 0: -0.1 * kl = [-0.05, 0.1, 0.0] + the split [0.3, 0.4, 0.5], the last token also gets the
    #        rest of the score, 2.0 - 1.2 = 0.8
    # row 1: -0.1 * kl = [-0.02, 0.05] + [0.1, 0.2]; the last real token gets 0.5 - 0.3 - 1.0
    assert torch.allclose(rewards, torch.tensor([[0.25, 0.5, 0.5 + 0.8], [0.08, 0.25 + 0.2 - 1.0, 0.0]]))
    # every row's rewards sum to what the terminal-only rewards sum to: only where they arrive moves
    plain, _ = ppo.shaped_rewards(logp, ref_logp, score, no_stop, mask, kl_coef=0.1, no_stop_penalty=1.0)
    assert torch.allclose(rewards.sum(1), plain.sum(1))


def test_token_credit_maps_the_rm_outputs_to_the_sampled_tokens_by_bytes():
    token_bytes = {1: 2, 2: 1, 3: 3, 4: 3, 5: 3, 9: 0}  # 9: the end of text (no bytes)
    # the RM reads the same tokens: output j to token j, the end of text's to the last token
    assert ppo.token_credit([0.4, 0.8, 1.2, 2.0], [1, 2, 3], [1, 2, 3, 9], token_bytes) == \
        pytest.approx([0.1, 0.2, 0.3, 0.5])
    # another segmentation of the same 6 bytes: RM token 4 ends at byte 3 (sampled token 2's last
    # byte), RM token 5 at byte 6 (token 3's)
    assert ppo.token_credit([0.3, 0.6, 0.9], [4, 5], [1, 2, 3, 9], token_bytes) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    # the completion is cut before a stop string: the tokens that complete it get only the end
    # of text's share (here the last one)
    assert ppo.token_credit([0.2, 1.0], [1], [1, 2, 3], token_bytes) == pytest.approx([0.1, 0.0, 0.5])
    # an empty completion: everything on the last token
    assert ppo.token_credit([0.7], [], [3, 9], token_bytes) == pytest.approx([0.0, 0.7])


def test_whiten_is_masked():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    w = ppo.whiten(x, mask)
    # real values 1, 2, 3, 4: mean 2.5, unbiased variance 5/3
    expected = (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / math.sqrt(5 / 3)
    assert torch.allclose(w[mask.bool()], expected, atol=1e-5)
    assert (w[~mask.bool()] == 0).all()


def test_policy_loss_hand_values_and_gradients():
    # four tokens: ratio 1.5 / 0.5 with advantage +1 / -1, clip 0.2
    #   ratio 1.5, A = +1: max(-1.5, -1.2) = -1.2   clipped (no gradient)
    #   ratio 1.5, A = -1: max( 1.5,  1.2) =  1.5   unclipped
    #   ratio 0.5, A = +1: max(-0.5, -0.8) = -0.5   unclipped
    #   ratio 0.5, A = -1: max( 0.5,  0.8) =  0.8   clipped (no gradient)
    # mean = (-1.2 + 1.5 - 0.5 + 0.8) / 4 = 0.15; clip fraction 2/4; a fifth, padded token is ignored
    old = torch.zeros(1, 5)
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5, 3.0]])).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    loss, clipfrac, approx_kl = ppo.policy_loss(logp, old, adv, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.15)
    assert clipfrac.item() == pytest.approx(0.5)
    # approx KL = mean((r - 1) - log r) over the 4 real tokens
    k = lambda r: (r - 1) - math.log(r)
    assert approx_kl.item() == pytest.approx((2 * k(1.5) + 2 * k(0.5)) / 4, rel=1e-5)
    loss.backward()
    # d/dlogp of -A * ratio / 4 = -A * ratio / 4 on the unclipped tokens, 0 on clipped and padded ones
    assert torch.allclose(logp.grad, torch.tensor([[0.0, 1.5 / 4, -0.5 / 4, 0.0, 0.0]]))


def test_value_loss_hand_values():
    # old value 0 everywhere, clip 0.2 -> the clipped prediction is clamp(v, -0.2, 0.2)
    #   v = 0.5, G = 1.0: unclipped 0.25, clipped (0.2 - 1)^2 = 0.64  -> 0.64 (clipped wins)
    #   v = 0.1, G = 1.0: inside the clip range: 0.81, 0.81           -> 0.81
    #   v = 0.5, G = -1.0: unclipped 2.25, clipped (0.2 + 1)^2 = 1.44 -> 2.25 (unclipped wins)
    # loss = 0.5 * mean(0.64, 0.81, 2.25) = 0.61666...; clip fraction 1/3
    values = torch.tensor([[0.5, 0.1, 0.5, 4.0]])
    old = torch.zeros(1, 4)
    returns = torch.tensor([[1.0, 1.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, clipfrac = ppo.value_loss(values, old, returns, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 2.25) / 3)
    assert clipfrac.item() == pytest.approx(1 / 3)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert ppo.explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert ppo.explained_variance(torch.full_like(returns, 2.5), returns, mask) == pytest.approx(0.0)
    # residuals [0.5, -0.5, 0.5, -0.5]: var 1/3 vs var(returns) 5/3 -> 1 - 0.2
    values = returns + torch.tensor([[-0.5, 0.5, -0.5, 0.5]])
    assert ppo.explained_variance(values, returns, mask) == pytest.approx(0.8)


def test_adaptive_kl_controller():
    # KL 12 vs target 6: error clipped to +0.2; 1000 completions of a 10000 horizon -> beta * 1.02
    assert ppo.adaptive_kl_coef(0.1, 12.0, 6.0, 10000, 1000) == pytest.approx(0.102)
    # KL 5.4 vs 6: error -0.1 -> beta * (1 - 0.1 * 0.1)
    assert ppo.adaptive_kl_coef(0.1, 5.4, 6.0, 10000, 1000) == pytest.approx(0.099)


# ----------------------------------------------------------------------------- models and a tiny out_dir

PROBLEMS = [
    {"task_id": f"t/{i}", "prompt": f"def {name}(a, b):\n    \"\"\"{doc}\"\"\"\n",
     "canonical_solution": f"    return {body}\n",
     "test": f"def check(candidate):\n    assert candidate(2, 3) == {value}\n", "entry_point": name}
    for i, (name, doc, body, value) in enumerate([
        ("add", "Return a plus b.", "a + b", 5), ("sub", "Return a minus b.", "a - b", -1),
        ("mul", "Return a times b.", "a * b", 6), ("big", "Return the larger of a and b.", "max(a, b)", 3)])]


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    """A miniature out/<preset>/ with random sft.pt / rm.pt, a ppo task file and code .bin files."""
    out = tmp_path_factory.mktemp("out")
    text = inspect.getsource(common) + inspect.getsource(ppo)
    enc = make_code_dir(out, text, vocab_size=320)
    (out / "tasks").mkdir()
    (out / "tasks" / "ppo.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    torch.manual_seed(0)
    lm = GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=96, n_layer=1, n_head=2, n_embd=32, bias=True))
    with torch.no_grad():  # a final-norm bias along the end-of-text embedding: completions of mixed lengths
        w = lm.transformer.wte.weight[enc.encode_single_token(tokenizer.EOT)]
        lm.transformer.ln_f.bias.copy_(2.5 * w / w.dot(w))
    save_checkpoint(out / "sft.pt", lm, tokenizer=tokenizer.to_state(enc), stage="sft", step=0)
    rm, _ = load_checkpoint(out / "sft.pt", head="scalar")
    save_checkpoint(out / "rm.pt", rm, tokenizer=tokenizer.to_state(enc), stage="reward", step=0)
    return out


def small_config(**kw):
    base = dict(iterations=2, batch_size=4, minibatch_size=2, ppo_epochs=2, max_new_tokens=16, lr=1e-3,
                warmup_iters=0, ptx_batch_size=2, ptx_block_size=32, eval_iters=2, gold=False, ckpt_interval=1,
                run_name="ppo_test")
    base.update(kw)
    return ppo.Config(**base)


def test_rollout_logprobs_equal_a_fresh_forward_pass(out_dir):
    """The log-probs that the update uses as pi_old (recomputed on the padded batch) equal both the
    sampler's own and those of an unpadded forward pass of each row alone."""
    policy, ref, value_model, reward_model, ckpt = ppo.load_models(*ppo.model_paths(ppo.Config(), out_dir), "cpu")
    enc = tokenizer.from_state(ckpt["tokenizer"])
    problems = {p["task_id"]: p for p in PROBLEMS}
    cfg = small_config(temperature=0.8, max_new_tokens=24)
    batch = ppo.rollout(policy, ref, value_model, reward_model, enc, problems, list(problems), cfg,
                        torch.Generator().manual_seed(0))
    mask = batch["mask"]
    assert mask.sum(1).min() >= 1 and mask.sum(1).max() == mask.shape[1]
    assert len(set(mask.sum(1).tolist())) > 1  # rows of different lengths: the padding is exercised
    assert torch.allclose(batch["logp"], batch["sample_logp"], atol=1e-5)
    assert torch.equal(batch["ref_logp"], batch["logp"])  # policy == reference before any update
    _, pad_id = tokenizer.special_ids(enc)
    P = batch["P"]
    for b, tid in enumerate(problems):
        prompt = enc.encode_ordinary(problems[tid]["prompt"])
        n = int(mask[b].sum())
        response = batch["seq"][b, P:P + n]
        assert batch["seq"][b, P - len(prompt):P].tolist() == prompt
        with torch.no_grad():
            logits, _ = policy(torch.tensor([prompt + response.tolist()]))
            values, _ = value_model(torch.tensor([prompt + response.tolist()]))
        logits = logits[0, len(prompt) - 1:-1] / 0.8
        logits[:, pad_id] = float("-inf")
        expected = F.log_softmax(logits, -1).gather(1, response[:, None]).squeeze(1)
        assert torch.allclose(batch["logp"][b, :n], expected, atol=1e-5)
        assert torch.allclose(batch["values"][b, :n], values[0, len(prompt) - 1:-1], atol=1e-5)
        assert (batch["logp"][b, n:] == 0).all()
    # the RM score is reward.py's convention (prompt + completion text + end of text)
    from reward import score_samples
    assert torch.allclose(batch["score"], torch.tensor(score_samples(reward_model, enc, problems, batch["samples"])))


def test_token_reward_splits_the_rm_score_over_the_sampled_tokens(out_dir, tmp_path):
    """--token_reward: each rollout's score_tokens sum to its RM score, sit on its real tokens only,
    and put each RM output on the token that produced it (the same tokens here: the RM re-encodes
    the sampled text as the sampler's tokens); a last-token RM is refused."""
    rm, ckpt = load_checkpoint(out_dir / "rm.pt")
    rm.config = dataclasses.replace(rm.config, pool="mean", loglik=True)
    save_checkpoint(tmp_path / "rm_mean.pt", rm, tokenizer=ckpt["tokenizer"], stage="reward", step=0)
    cfg = small_config(temperature=0.8, max_new_tokens=24, token_reward=True, rm=str(tmp_path / "rm_mean.pt"))
    policy, ref, value_model, reward_model, ckpt = ppo.load_models(*ppo.model_paths(cfg, out_dir), "cpu")
    enc = tokenizer.from_state(ckpt["tokenizer"])
    problems = {p["task_id"]: p for p in PROBLEMS}
    batch = ppo.rollout(policy, ref, value_model, reward_model, enc, problems, list(problems), cfg,
                        torch.Generator().manual_seed(0))
    split, mask = batch["score_tokens"], batch["mask"]
    assert torch.allclose(split.sum(1), batch["score"], atol=1e-5)
    assert (split[mask == 0] == 0).all() and (split[mask == 1] != 0).any()
    from reward import score_samples
    _, outputs = score_samples(reward_model, enc, problems, batch["samples"], per_token=True)
    checked = 0
    for b, o in enumerate(outputs):
        n_text = len(enc.encode_ordinary(batch["samples"][b]["completion"]))
        sampled = batch["seq"][b, batch["P"]:batch["P"] + n_text].tolist()
        if sampled == enc.encode_ordinary(batch["samples"][b]["completion"]) and n_text < int(mask[b].sum()):
            assert split[b, :n_text].tolist() == pytest.approx([x / len(o) for x in o[:-1]], abs=1e-6)
            checked += 1
    assert checked > 0
    with pytest.raises(SystemExit):
        ppo.train(small_config(token_reward=True), out_dir)  # rm.pt pools "last"


def test_value_model_reads_only_the_head_of_a_loglik_reward_model(out_dir, tmp_path):
    """With a --loglik reward model, the reward counts the likelihood term; the value model initialised
    from it is the trunk + scalar head alone (a state's value, not a token's likelihood)."""
    for name in ("sft.pt", "tasks", "code"):
        (tmp_path / name).symlink_to(out_dir / name)
    rm, ckpt = load_checkpoint(out_dir / "rm.pt")
    rm.config.loglik = True
    save_checkpoint(tmp_path / "rm.pt", rm, tokenizer=ckpt["tokenizer"], stage="reward", step=0)
    _, _, value_model, reward_model, _ = ppo.load_models(*ppo.model_paths(ppo.Config(), tmp_path), "cpu")
    assert reward_model.config.loglik and not value_model.config.loglik
    idx = torch.randint(0, 100, (1, 7))
    with torch.no_grad():
        assert not torch.allclose(value_model(idx)[0], reward_model(idx)[0])


def test_ptx_gradient_is_the_sum_of_the_ppo_and_lm_gradients(out_dir):
    """One combined PPO-ptx step's gradient = grad(PPO loss) + ptx_coef * grad(LM loss)."""
    policy, ref, value_model, reward_model, ckpt = ppo.load_models(*ppo.model_paths(ppo.Config(), out_dir), "cpu")
    enc = tokenizer.from_state(ckpt["tokenizer"])
    _, pad_id = tokenizer.special_ids(enc)
    problems = {p["task_id"]: p for p in PROBLEMS}
    cfg = small_config(ptx_coef=0.7)
    batch = ppo.rollout(policy, ref, value_model, reward_model, enc, problems, list(problems), cfg,
                        torch.Generator().manual_seed(1))
    batch["advantages"] = ppo.whiten(torch.randn_like(batch["mask"]), batch["mask"])
    batch["returns"] = torch.randn_like(batch["mask"]) * batch["mask"]
    with torch.no_grad():  # move the policy off pi_old so that the ratio is not 1 everywhere
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows = torch.tensor([0, 2, 3])
    x = torch.randint(0, enc.n_vocab - 2, (2, 16))
    y = torch.randint(0, enc.n_vocab - 2, (2, 16))

    def grads():
        g = [p.grad.clone() for p in policy.parameters()]
        policy.zero_grad(set_to_none=False)
        return g

    policy.zero_grad(set_to_none=False)
    loss, stats = ppo.minibatch_loss(policy, value_model, batch, rows, (x, y), cfg, pad_id)
    loss.backward()
    combined = grads()
    assert "ptx_loss" in stats
    logp, _ = ppo.response_logprobs(policy, batch["seq"][rows], batch["valid"][rows], batch["P"], cfg.temperature, pad_id)
    pg_loss, _, _ = ppo.policy_loss(logp, batch["logp"][rows], batch["advantages"][rows], batch["mask"][rows], cfg.clip)
    pg_loss.backward()
    g_ppo = grads()
    _, lm_loss = policy(x, y)
    lm_loss.backward()
    g_lm = grads()
    assert lm_loss.item() == pytest.approx(stats["ptx_loss"].item())
    assert any(g.abs().sum() > 0 for g in g_ppo) and any(g.abs().sum() > 0 for g in g_lm)
    for c, a, b in zip(combined, g_ppo, g_lm):
        assert torch.allclose(c, a + 0.7 * b, atol=1e-6)
    # and plain PPO (ptx_coef 0) ignores the pretraining batch
    loss0, stats0 = ppo.minibatch_loss(policy, value_model, batch, rows, (x, y), small_config(ptx_coef=0.0), pad_id)
    loss0.backward()
    assert "ptx_loss" not in stats0
    for c, a in zip(grads(), g_ppo):
        assert torch.allclose(c, a, atol=1e-6)


def test_smoke_run_and_exact_resume(out_dir):
    """Two iterations end to end (rollout, update with ptx, log, checkpoint, results.json, CSV);
    an interrupted run resumed from its checkpoint ends with the same weights."""
    cfg = small_config(ptx_coef=0.5, adaptive_kl=True, gold=True, workers=1)
    history = ppo.train(cfg, out_dir)
    assert [r["iter"] for r in history] == [0, 1]
    for key in ("rm_score", "kl", "entropy", "approx_kl", "clipfrac", "vf_loss", "explained_var",
                "response_len", "no_stop", "ptx_loss"):
        assert math.isfinite(history[-1][key]), key
    assert set(history[0]["seconds"]) == {"generate", "score", "train", "gold"}
    assert all(0 <= r["gold_pass"] <= r["gold_frac"] <= 1 for r in history)  # random models: ~0
    assert history[1]["kl"] != 0.0  # the policy moved away from the reference
    assert history[1]["kl_coef"] != cfg.kl_coef  # adaptive KL moved beta
    log = [json.loads(line) for line in (out_dir / "logs" / "ppo_test.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log] == [0, 1]
    results = json.loads((out_dir / "results.json").read_text())
    assert set(results["models"]["ppo_test"]) == {"kl", "rm_score"}
    assert (out_dir / "ppo_test_overoptimization.csv").read_text().startswith("iter,kl,rm_score,gold_pass")
    straight = torch.load(out_dir / "ppo_test.pt", weights_only=False)
    assert straight["stage"] == "ppo" and straight["step"] == 2
    load_checkpoint(out_dir / "ppo_test.pt")  # loadable as a plain language model by evaluate.py

    ppo.train(cfg, out_dir, stop_at=1)
    resumed = ppo.train(cfg, out_dir, resume=True)
    assert [r["iter"] for r in resumed] == [0, 1]
    assert resumed[1]["rm_score"] == pytest.approx(history[1]["rm_score"], abs=1e-5)
    again = torch.load(out_dir / "ppo_test.pt", weights_only=False)
    for k in straight["model"]:
        assert torch.allclose(straight["model"][k], again["model"][k], atol=1e-6), k
    for k in straight["value_model"]:
        assert torch.allclose(straight["value_model"][k], again["value_model"][k], atol=1e-6), k
    assert again["kl_coef"] == pytest.approx(straight["kl_coef"])


def test_cli_errors(out_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        ppo.main(["--out_dir", str(tmp_path), "--gold=false"])
    assert "sft.pt not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ppo.main(["--out_dir", str(out_dir), "--batch_size=5", "--minibatch_size=2"])
    assert "multiple of minibatch_size" in capsys.readouterr().err


def test_normalize_score_hand_example_and_units():
    # scores 1, 2, 3 with mean 2 and std 0.5 -> -2, 0, 2
    assert torch.allclose(ppo.normalize_score(torch.tensor([1.0, 2.0, 3.0]), 2.0, 0.5),
                          torch.tensor([-2.0, 0.0, 2.0]))
    # the reference's own scores, normalised by their own mean and std, have mean 0 and std 1
    scores = torch.randn(1000) * 0.07 - 0.3
    z = ppo.normalize_score(scores, float(scores.mean()), float(scores.std()))
    assert abs(float(z.mean())) < 1e-5 and float(z.std()) == pytest.approx(1.0, abs=1e-5)


def test_explicit_init_reference_and_rm_paths_are_the_models_used(out_dir, tmp_path):
    """ppo.py --init/--ref/--rm: the policy, the reference and the reward / value models are
    exactly those checkpoints (three different ones here), not out_dir's sft.pt and rm.pt."""
    state = tokenizer.to_state(tokenizer.from_state(torch.load(out_dir / "sft.pt", weights_only=False)["tokenizer"]))
    paths = {}
    for name, seed, head in (("init", 1, "lm"), ("ref", 2, "lm"), ("rm", 3, "scalar")):
        torch.manual_seed(seed)
        cfg = GPTConfig(vocab_size=load_checkpoint(out_dir / "sft.pt")[0].config.vocab_size, block_size=96,
                        n_layer=1, n_head=2, n_embd=32, bias=True, head=head)
        paths[name] = tmp_path / f"{name}.pt"
        save_checkpoint(paths[name], GPT(cfg), tokenizer=state, stage=name, step=0)
    cfg = ppo.Config(init=str(paths["init"]), ref=str(paths["ref"]), rm=str(paths["rm"]))
    policy, ref, value_model, reward_model, _ = ppo.load_models(*ppo.model_paths(cfg, out_dir), "cpu")
    for model, name in ((policy, "init"), (ref, "ref"), (value_model, "rm"), (reward_model, "rm")):
        saved = torch.load(paths[name], weights_only=False)["model"]
        for k, v in model.state_dict().items():
            assert torch.equal(v, saved[k]), (name, k)
    assert ppo.model_paths(ppo.Config(), out_dir) == (out_dir / "sft.pt", out_dir / "sft.pt", out_dir / "rm.pt")


def test_kl_sweep_writes_one_row_per_beta(out_dir, tmp_path):
    import shutil
    sweep = tmp_path / "out"
    shutil.copytree(out_dir, sweep)
    shutil.copy(sweep / "tasks" / "ppo.jsonl", sweep / "tasks" / "test.jsonl")
    cfg = small_config(run_name="", kl_coefs="0.01,0.3", sweep_iterations=1, gold=True, workers=1, eval_iters=0,
                       norm_samples=8)
    rows = ppo.kl_sweep(cfg, sweep, "tiny", [0.01, 0.3])
    saved = json.loads((sweep / "kl_sweep.json").read_text())["rows"]
    assert saved == rows and [r["kl_coef"] for r in rows] == [0.01, 0.3]
    for r in rows:
        assert r["iterations"] == 1 and 0 <= r["pass@1"] <= 1 and 0 <= r["gold_pass"] <= 1
        assert math.isfinite(r["kl"]) and math.isfinite(r["rm_score"])
    results = sweep / "results.json"  # the sweep's runs stay out of the chain's results table
    assert not results.exists() or not any("kl_sweep" in m for m in json.loads(results.read_text()).get("models", {}))


def test_minibatch_in_length_sorted_parts_equals_one_pass(out_dir):
    """minibatch_loss runs the policy and value model over two length-sorted halves of the
    minibatch (less padding): the loss, its stats and both models' gradients equal one pass."""
    policy, ref, value_model, reward_model, ckpt = ppo.load_models(*ppo.model_paths(ppo.Config(), out_dir), "cpu")
    enc = tokenizer.from_state(ckpt["tokenizer"])
    _, pad_id = tokenizer.special_ids(enc)
    problems = {p["task_id"]: p for p in PROBLEMS}
    cfg = small_config(max_new_tokens=24)
    batch = ppo.rollout(policy, ref, value_model, reward_model, enc, problems, list(problems) * 2, cfg,
                        torch.Generator().manual_seed(2))
    assert len(set(batch["mask"].sum(1).tolist())) > 2  # responses of several lengths
    batch["advantages"] = ppo.whiten(torch.randn_like(batch["mask"]), batch["mask"])
    batch["returns"] = torch.randn_like(batch["mask"]) * batch["mask"]
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows = torch.tensor([5, 0, 7, 2, 3, 6])
    out = []
    for parts in (1, 2, 3):
        loss, stats = ppo.minibatch_loss(policy, value_model, batch, rows, None, cfg, pad_id, parts=parts)
        loss.backward()
        grads = [p.grad.clone() for m in (policy, value_model) for p in m.parameters() if p.grad is not None]
        policy.zero_grad(set_to_none=True), value_model.zero_grad(set_to_none=True)
        out.append((loss, stats, grads))
    for loss, stats, grads in out[1:]:
        assert torch.allclose(loss, out[0][0], atol=1e-6)
        assert all(torch.allclose(stats[k], out[0][1][k], atol=1e-6) for k in stats)
        assert len(grads) == len(out[0][2]) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, out[0][2]))
