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
    terminal = ppo.terminal_reward(torch.tensor([2.0, 0.5]), torch.tensor([False, True]), no_stop_penalty=1.0)
    assert torch.allclose(terminal, torch.tensor([2.0, -0.5]))  # row 1 never stopped: 0.5 - 1.0
    rewards, kl = ppo.shaped_rewards(logp, ref_logp, terminal, mask, kl_coef=0.1)
    # row 0: kl = [0.5, -1.0, 0.0]; rewards = -0.1 * kl, plus the terminal 2.0 at the last token
    # row 1: kl = [0.2, -0.5]; the last (2nd) token gets 0.05 - 0.5
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0], [0.2, -0.5, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1, 2.0], [-0.02, 0.05 - 0.5, 0.0]]))


def test_leave_one_out_baseline_hand_example():
    # two prompts x k = 3 completions: each reward minus the mean of its group's other two
    r = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.2, 0.8])
    # group 0: 1 - (0 + 0.5)/2 = 0.75, 0 - (1 + 0.5)/2 = -0.75, 0.5 - (1 + 0)/2 = 0
    # group 1: 0.2 - (0.2 + 0.8)/2 = -0.3 (twice), 0.8 - 0.2 = 0.6
    assert torch.allclose(ppo.leave_one_out(r, 3), torch.tensor([0.75, -0.75, 0.0, -0.3, -0.3, 0.6]))
    assert torch.allclose(ppo.leave_one_out(r, 3), 3 / 2 * (r - r.view(2, 3).mean(1).repeat_interleave(3)))
    assert torch.equal(ppo.leave_one_out(r, 1), r)  # one sample per prompt: no baseline
    # a group whose completions all earn the same gets no signal, whatever the level
    assert torch.equal(ppo.leave_one_out(torch.tensor([0.4, 0.4, 0.4, 0.4]), 4), torch.zeros(4))


def test_climb_hand_example():
    up = ppo.climb([0.0, 1.0, 5.0, 3.0, 4.0, 6.0], 2)
    # first two: mean 0.5, var 0.5; last two: mean 5, var 2; se = sqrt(0.5 / 2 + 2 / 2)
    assert up == pytest.approx({"first": 0.5, "last": 5.0, "diff": 4.5, "se": math.sqrt(1.25)})


def test_prompts_are_met_once_before_any_repeats():
    order = ["a", "b", "c", "d", "e"]
    assert ppo.prompt_batch(order, 0, 2) == (["a", "b"], 0.0)
    assert ppo.prompt_batch(order, 1, 2) == (["c", "d"], 0.0)
    assert ppo.prompt_batch(order, 2, 2) == (["e", "a"], 0.5)  # the shuffle starts again
    assert ppo.prompt_batch(order, 3, 2) == (["b", "c"], 1.0)


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
    base = dict(iterations=2, batch_size=4, minibatch_size=2, samples_per_prompt=1, ppo_epochs=2, max_new_tokens=16, lr=1e-3,
                warmup_iters=0, ptx_batch_size=2, ptx_block_size=32, eval_iters=2, gold=False, ckpt_interval=1,
                run_name="ppo_test")
    base.update(kw)
    return ppo.Config(**base)


def test_rollout_logprobs_equal_a_fresh_forward_pass(out_dir):
    """The log-probs that the update uses as pi_old (the sampler's own) equal both a forward pass
    over the padded batch (what the update computes) and one of each row alone, unpadded."""
    policy, ref, value_model, reward_model, ckpt = ppo.load_models(*ppo.model_paths(ppo.Config(), out_dir), "cpu")
    enc = tokenizer.from_state(ckpt["tokenizer"])
    problems = {p["task_id"]: p for p in PROBLEMS}
    cfg = small_config(temperature=0.8, max_new_tokens=24)
    batch = ppo.rollout(policy, ref, value_model, reward_model, enc, problems, list(problems), cfg,
                        torch.Generator().manual_seed(0))
    mask = batch["mask"]
    assert mask.sum(1).min() >= 1 and mask.sum(1).max() == mask.shape[1]
    assert len(set(mask.sum(1).tolist())) > 1  # rows of different lengths: the padding is exercised
    # pi_old is the sampler's own log-probs: equal to the policy's forward pass over the packed batch
    _, pad_id = tokenizer.special_ids(enc)
    forward = ppo.response_logprobs(policy, batch["seq"], batch["valid"], batch["P"], 0.8, pad_id)
    assert torch.allclose(batch["logp"], forward, atol=1e-5)
    assert torch.allclose(batch["ref_logp"], batch["logp"], atol=1e-5)  # policy == reference before any update
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
    logp = ppo.response_logprobs(policy, batch["seq"][rows], batch["valid"][rows], batch["P"], cfg.temperature, pad_id)
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
    """Two iterations end to end (rollout, update with ptx, log, checkpoint, results.json);
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
    assert set(results["models"]["ppo_test"]) == {"reward", "kl", "rm_score", "gold_pass", "gold_frac", "climb",
                                                  "gold_climb"}
    assert results["models"]["ppo_test"]["climb"]["of"] == "rm_score"
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


HAND = {"task_id": "hand/0", "prompt": "def f(x):\n", "entry_point": "f", "canonical_solution": "    return 2 * x\n",
        "test": "def check(candidate):\n" + "".join(f"    assert candidate({x}) == {2 * x}\n" for x in (0, 1, 2, 3))}


def test_exec_reward_is_the_labelers_score_on_a_hand_example():
    """The labeler (reward.label, what reward.py ranks by and ppo.py --reward=exec optimises) scores
    a completion by the fraction of the test's asserts that pass."""
    from reward import label
    completions = ["    return 2 * x\n",                       # all 4 asserts
                   "    return 2 * x if x < 3 else 0\n",       # 3 of 4
                   "    return x\n",                           # only f(0) == 0: 1 of 4
                   "    import sys; sys.exit(0)\n",            # exits before check() returns
                   "    return (\n"]                           # a syntax error
    scores, rows = label({"hand/0": HAND}, [{"task_id": "hand/0", "completion": c} for c in completions])
    assert scores == [1.0, 0.75, 0.25, 0.0, 0.0]
    assert [r["passed"] for r in rows] == [True, False, False, False, False]


def test_exec_run_optimises_the_fraction_of_tests_passed(out_dir):
    """--reward=exec: each iteration's mean reward is the rollouts' mean fraction of tests passed
    (the labeler's score, logged as gold_frac) minus the no-stop penalty and the KL penalty; no RM
    score is computed; results.json records the climb of gold_frac."""
    cfg = small_config(reward="exec", run_name="ppo_exec_test", workers=1, eval_iters=0)
    history = ppo.train(cfg, out_dir)
    for r in history:
        assert r["rm_score"] is None and 0 <= r["gold_frac"] <= 1
        expected = r["gold_frac"] - cfg.no_stop_penalty * r["no_stop"] - r["kl_coef"] * r["kl"]
        assert r["reward"] == pytest.approx(expected, abs=1e-5)
    m = json.loads((out_dir / "results.json").read_text())["models"]["ppo_exec_test"]
    assert m["reward"] == "exec" and m["climb"]["of"] == "gold_frac" and "rm_score" not in m


def test_samples_per_prompt_runs_k_samples_of_each_prompt_with_a_leave_one_out_baseline(out_dir, monkeypatch):
    """--samples_per_prompt=2: each iteration samples 2 completions of each of batch_size / 2
    prompts (consecutive rows), prompts are met once before any repeats, and the leave-one-out
    baseline leaves every group's terminal rewards summing to 0, so the mean reward is the KL term."""
    seen = []
    rollout = ppo.rollout
    monkeypatch.setattr(ppo, "rollout", lambda *a, **kw: seen.append(a[6]) or rollout(*a, **kw))
    cfg = small_config(samples_per_prompt=2, run_name="ppo_k2_test", iterations=3, gold=True, workers=1,
                       eval_iters=0)
    history = ppo.train(cfg, out_dir)
    assert len(seen) == 3 and all(len(ids) == 4 and ids[0] == ids[1] and ids[2] == ids[3] != ids[0] for ids in seen)
    firsts = [ids[j] for ids in seen for j in (0, 2)]
    assert len(set(firsts[:4])) == 4  # the 4 prompts once each, then the shuffle starts again
    assert [r["seen"] for r in history] == [0.0, 0.0, 1.0]
    for r in history:
        assert r["reward"] == pytest.approx(-r["kl_coef"] * r["kl"], abs=1e-5)
