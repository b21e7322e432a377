import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

import reward
import tokenizer as tok
from model import GPT, GPTConfig, load_checkpoint, save_checkpoint
from reward import batch_loss, rm_loss, score_sequences

TEXTS = ["def add(a, b):\n    return a + b\n", "def neg(x):\n    \"\"\"Negate x.\"\"\"\n    return -x\n"] * 20


@pytest.fixture(scope="module")
def enc():
    return tok.train(TEXTS, 300)


def scalar_model(enc, seed=0, pool="last", loglik=False):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=32,
                         head="scalar", pool=pool, loglik=loglik)).eval()


def test_rm_loss_hand_worked_k3():
    # K = 3, rewards r = (1, 0, 2), labeler scores s = (0.5, 0, 0.5). C(3,2) = 3 pairs:
    #   (y0, y1): s0 > s1, y0 wins: log sigmoid(1 - 0) = -log(1 + e^-1) = -0.313262
    #   (y2, y1): s2 > s1, y2 wins: log sigmoid(2 - 0) = -log(1 + e^-2) = -0.126928
    #   (y0, y2): tied scores: no comparison, adds nothing
    # loss = -(1/3) * (-0.313262 - 0.126928) = 0.146730
    loss = rm_loss(torch.tensor([1.0, 0.0, 2.0]), [0.5, 0.0, 0.5])
    assert loss.item() == pytest.approx(0.146730, abs=1e-6)


def test_rm_loss_counts_every_non_tied_pair_once_with_weight_one_over_c_k_2():
    torch.manual_seed(0)
    K = 6
    rewards = torch.randn(K, requires_grad=True)
    scores = [0.0, 1.0, 0.5, 1.0, 0.0, 0.25]   # two ties
    loss = rm_loss(rewards, scores)
    expected = 0.0
    for i, j in itertools.combinations(range(K), 2):
        if scores[i] == scores[j]:
            continue
        w, l = (i, j) if scores[i] > scores[j] else (j, i)
        expected = expected - F.logsigmoid(rewards[w] - rewards[l]) / math.comb(K, 2)
    assert torch.allclose(loss, expected)
    g_loss, = torch.autograd.grad(loss, rewards)
    g_exp, = torch.autograd.grad(expected, rewards)
    assert torch.allclose(g_loss, g_exp)
    assert reward.n_pairs(scores) == math.comb(K, 2) - 2


def test_rm_loss_all_tied_is_zero_with_zero_gradient():
    rewards = torch.randn(4, requires_grad=True)
    loss = rm_loss(rewards, [0.5] * 4)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(rewards.grad, torch.zeros(4))


def test_rm_loss_prefers_the_labelers_order():
    scores = [1.0, 0.0, 0.5]
    assert rm_loss(torch.tensor([3.0, -3.0, 0.0]), scores) < rm_loss(torch.tensor([-3.0, 3.0, 0.0]), scores)


@pytest.mark.parametrize("pool", ["last", "mean"])
def test_batch_loss_one_forward_row_per_completion(enc, monkeypatch, pool):
    """All K completions of every prompt go through one forward pass (sum of K rows, not one row per
    pair); the loss is the mean over prompts of Eq. 1 for each prompt."""
    rm = scalar_model(enc, pool=pool)
    eot, _ = tok.special_ids(enc)
    pad = enc.encode_single_token(tok.PAD)
    groups = []
    for g, (prompt, k) in enumerate((("def f(x):\n", 4), ("def add(a, b):\n", 3))):
        seqs = [reward.rm_sequence(enc, prompt, f"    return x + {i}\n" * (1 + i % 2), 64, eot) for i in range(k)]
        groups.append((seqs, [float(i % 3) for i in range(k)]))
    rows = []
    forward = rm.forward
    monkeypatch.setattr(rm, "forward", lambda idx, *a, **kw: (rows.append(idx.shape[0]), forward(idx, *a, **kw))[1])
    loss, per_prompt = batch_loss(rm, groups, pad)
    # (pool="mean" runs each distinct prompt once first, then the 7 completions against it)
    assert rows == ([7] if pool == "last" else [2, 7])
    monkeypatch.setattr(rm, "forward", forward)
    expected = torch.stack([rm_loss(reward.score(rm, seqs, pad), s) for seqs, s in groups]).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    assert [len(r) for r in per_prompt] == [4, 3]


@pytest.mark.parametrize("loglik", [False, True])
def test_shared_prompts_run_once_give_the_whole_sequences_scores_and_gradients(enc, loglik, monkeypatch):
    """score_sequences (pool="mean") runs a prompt that several completions share through the model
    once and copies its KV cache to them: the same scores and gradients as scoring each whole
    sequence alone, with prompts of different lengths (left-padded) and completions of different
    lengths (right-padded)."""
    rm = scalar_model(enc, pool="mean", loglik=loglik)
    eot, pad = tok.special_ids(enc)
    f, add = "def f(x):\n", "def add(a, b):\n    \"\"\"Add.\"\"\"\n"
    seqs = [reward.rm_sequence(enc, p, c, 64, eot) for p, c in (
        (f, "    return x\n"), (add, "    return a + b\n"), (f, "    return -x + 1\n"), (f, "    pass\n"),
        (add, "    return b\n"))]
    rows = []
    forward = rm.forward
    monkeypatch.setattr(rm, "forward", lambda idx, *a, **kw: (rows.append(idx.shape[0]), forward(idx, *a, **kw))[1])
    shared = score_sequences(rm, [t for t, _ in seqs], pad, [s for _, s in seqs])
    assert rows == [2, 5]  # the 2 distinct prompts, then the 5 completions
    g_shared = torch.autograd.grad((shared * torch.arange(1.0, 6.0)).sum(), list(rm.parameters()), allow_unused=True)
    alone = torch.cat([score_sequences(rm, [t], pad, [s]) for t, s in seqs])  # one row each: nothing shared
    g_alone = torch.autograd.grad((alone * torch.arange(1.0, 6.0)).sum(), list(rm.parameters()), allow_unused=True)
    assert torch.allclose(shared, alone, atol=1e-5)
    for a, b in zip(g_shared, g_alone):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-5))


def test_pairwise_accuracy_skips_ties():
    # pairs (y0 > y1): r .3 > .25, right; (y2 > y1): r .2 < .25, wrong; (y0, y2) tied: not counted
    assert reward.pairwise_accuracy([0.3, 0.25, 0.2], [1.0, 0.0, 1.0]) == (1, 2)
    assert reward.pairwise_accuracy([0.0, 1.0], [1.0, 0.0]) == (0, 1)


def test_rm_sequence_convention_and_truncation(enc):
    eot = enc.encode_single_token(tok.EOT)
    prompt = enc.encode_ordinary("def f(x):\n")
    seq, start = reward.rm_sequence(enc, "def f(x):\n", "    return x\n", 64, eot)
    assert seq == prompt + enc.encode_ordinary("    return x\n") + [eot] and start == len(prompt)
    long, start = reward.rm_sequence(enc, "def f(x):\n", "    return x\n" * 50, 64, eot)
    assert len(long) == 64 and long[-1] == eot and long[:len(prompt)] == prompt  # the completion is cut
    assert start == len(prompt)


def test_mean_pool_is_the_mean_over_completion_and_eot(enc):
    """pool="mean": r(x, y) = mean of the head's outputs at the completion's tokens and the end of
    text, never the prompt's; right padding in a batch does not change it; pool="last" is the last
    token's output."""
    rm = scalar_model(enc, pool="mean")
    eot, pad = tok.special_ids(enc)
    seqs = [reward.rm_sequence(enc, "def f(x):\n", c, 64, eot) for c in ("    return x\n", "    return x + 1 + 2\n")]
    with torch.no_grad():
        batched = reward.score(rm, seqs, pad)
        for (tokens, start), r in zip(seqs, batched):
            values, _ = rm(torch.tensor([tokens]))
            assert start > 0 and r.item() == pytest.approx(values[0, start:].mean().item(), abs=1e-5)
            assert r.item() != pytest.approx(values[0].mean().item(), abs=1e-4)
        rm.config.pool = "last"
        last = reward.score(rm, seqs, pad)
        for (tokens, _), r in zip(seqs, last):
            assert r.item() == pytest.approx(rm(torch.tensor([tokens]))[0][0, -1].item(), abs=1e-5)
    with pytest.raises(ValueError):
        score_sequences(scalar_model(enc, pool="mean"), [seqs[0][0]], pad)


def test_comparisons_file_round_trip(tmp_path):
    rows = [{"task_id": "t/0", "prompt": "def f(x):\n", "completions": ["    return x\n", "    pass\n", "    return 1\n"],
             "scores": [1.0, 0.0, 0.5]},
            {"task_id": "t/1", "prompt": "def g():\n", "completions": ["    return 2\n", "    return 3\n"],
             "scores": [0, 0]}]
    path = tmp_path / "comparisons.jsonl"
    reward.write_comparisons(path, rows)
    back = reward.read_comparisons(path)
    assert back == [{**r, "scores": [float(s) for s in r["scores"]]} for r in rows]
    assert [reward.n_pairs(r["scores"]) for r in back] == [3, 0]


@pytest.mark.parametrize("line", ['{"task_id": "t", "prompt": "p", "completions": ["a", "b"], "scores": [1]}',
                                  '{"task_id": "t", "prompt": "p", "completions": ["a", "b"], "scores": ["x", 1]}',
                                  'not json'])
def test_malformed_comparisons_file_is_a_one_line_error(tmp_path, capsys, line):
    path = tmp_path / "c.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(SystemExit):
        reward.read_comparisons(path)
    err = capsys.readouterr().err
    assert "c.jsonl:1" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("pool,loglik", [("last", False), ("mean", False), ("mean", True)])
def test_score_samples_batched_equals_one_by_one_in_order(enc, pool, loglik):
    rm = scalar_model(enc, pool=pool, loglik=loglik)
    problems = {"a": {"prompt": "def f(x):\n"}, "b": {"prompt": "def add(a, b):\n    \"\"\"Add.\"\"\"\n"}}
    samples = [{"task_id": t, "completion": c} for t, c in
               [("a", "    return x\n"), ("b", "    return a + b\n"), ("a", "    pass\n"), ("b", "")]]
    batched = reward.score_samples(rm, enc, problems, samples, batch_size=3)
    alone = [reward.score_samples(rm, enc, problems, [s])[0] for s in samples]
    assert batched == pytest.approx(alone, abs=1e-5)
    eot, pad = tok.special_ids(enc)
    direct = reward.score(rm, [reward.rm_sequence(enc, "def f(x):\n", "    return x\n", 64, eot)], pad)
    assert batched[0] == pytest.approx(direct.item(), abs=1e-5)


@pytest.mark.parametrize("pool", ["last", "mean"])
def test_center_bias_makes_reference_mean_zero(enc, pool):
    rm = scalar_model(enc, pool=pool)
    eot, pad = tok.special_ids(enc)
    seqs = [reward.rm_sequence(enc, "def f(x):\n", f"    return x + {i}\n", 64, eot) for i in range(5)]
    with torch.no_grad():
        rm.score_head.bias += 3.0
    reward.center_bias(rm, seqs, pad, batch_size=2)
    with torch.no_grad():
        assert reward.score(rm, seqs, pad).mean().item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("loglik", [True, False])
def test_reward_end_to_end_on_a_comparisons_file(tmp_path, enc, loglik):
    """sft.pt + tasks/rm.jsonl + a comparisons file -> rm.pt (scalar head, stage "reward") that ranks a
    learnable preference (a body that returns beats `pass`) on held-out prompts; results.json updated."""
    torch.manual_seed(0)
    sft_model = GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=32))
    save_checkpoint(tmp_path / "sft.pt", sft_model, tokenizer=tok.to_state(enc), stage="sft", step=0)
    problems, rows = [], []
    for i in range(40):
        prompt = f"def f{i}(x):\n"
        problems.append({"task_id": f"t/{i}", "prompt": prompt, "canonical_solution": f"    return x + {i}\n",
                         "test": "", "entry_point": f"f{i}"})
        rows.append({"task_id": f"t/{i}", "prompt": prompt,
                     "completions": [f"    return x + {i}\n", "    pass\n", f"    return -{i}\n", "    pass\n"],
                     "scores": [1.0, 0.0, 0.5, 0.0]})
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "rm.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    reward.write_comparisons(tmp_path / "mine.jsonl", rows)
    cfg = reward.Config(epochs=4, batch_size=4, lr=3e-3, warmup_iters=2, holdout=0.25, device="cpu", loglik=loglik)
    summary = reward.train(cfg, tmp_path, comparisons=[tmp_path / "mine.jsonl"])
    rm, ckpt = load_checkpoint(tmp_path / "rm.pt")
    assert ckpt["stage"] == "reward" and rm.config.head == "scalar" and rm.config.pool == cfg.pool
    assert rm.config.loglik == loglik
    assert summary["n_comparisons"] == 30 * 5 and summary["n_val_comparisons"] == 10 * 5
    assert summary["val_accuracy"] >= 0.8
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["reward_model"] == {"val_accuracy": round(summary["val_accuracy"], 4), "n_comparisons": 150}
    refs = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in problems]
    ref_scores = reward.score_samples(rm, enc, {p["task_id"]: p for p in problems}, refs)
    assert sum(ref_scores) / len(ref_scores) == pytest.approx(0.0, abs=1e-4)


def sft_and_rm_prompts(tmp_path, enc, n):
    """tmp_path as an out dir: a random sft.pt and tasks/rm.jsonl with n prompts `def f<i>(x):`."""
    torch.manual_seed(0)
    sft_model = GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()
    save_checkpoint(tmp_path / "sft.pt", sft_model, tokenizer=tok.to_state(enc), stage="sft", step=0)
    problems = [{"task_id": f"t/{i}", "prompt": f"def f{i}(x):\n", "canonical_solution": "    return x\n",
                 "test": "", "entry_point": f"f{i}"} for i in range(n)]
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "rm.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    return sft_model, problems


def test_loglik_rm_starts_at_the_sft_mean_log_likelihood(tmp_path, enc):
    """--loglik (the default): before any update, r(x, y) differs between completions exactly as the
    SFT model's mean log-likelihood of completion + end of text does (the bias then centres it)."""
    sft_model, problems = sft_and_rm_prompts(tmp_path, enc, 8)
    comps = ["    return x\n", "    pass\n", "    return -x + 1\n"]
    rows = [{"task_id": p["task_id"], "prompt": p["prompt"], "completions": comps, "scores": [1.0, 0.0, 0.5]}
            for p in problems]
    reward.write_comparisons(tmp_path / "c.jsonl", rows)
    cfg = reward.Config(lr=0.0, holdout=0.25, device="cpu")
    assert cfg.loglik
    reward.train(cfg, tmp_path, comparisons=[tmp_path / "c.jsonl"])
    rm, _ = load_checkpoint(tmp_path / "rm.pt")
    assert rm.config.loglik
    eot, pad = tok.special_ids(enc)
    seqs = [reward.rm_sequence(enc, problems[0]["prompt"], c, 64, eot) for c in comps]
    with torch.no_grad():
        r = reward.score(rm, seqs, pad)
        mean_ll = []
        for tokens, start in seqs:
            logits, _ = sft_model(torch.tensor([tokens]))
            lp = F.log_softmax(logits[0, :-1], -1).gather(1, torch.tensor(tokens[1:])[:, None]).squeeze(1)
            mean_ll.append(lp[start - 1:].mean())
    mean_ll = torch.stack(mean_ll)
    assert torch.allclose(r - r[0], mean_ll - mean_ll[0], atol=1e-4)


def test_score_cli_adds_rm_score(tmp_path, enc):
    rm = scalar_model(enc)
    save_checkpoint(tmp_path / "rm.pt", rm, tokenizer=tok.to_state(enc), stage="reward", step=0)
    (tmp_path / "p.jsonl").write_text(json.dumps({"task_id": "a", "prompt": "def f(x):\n", "canonical_solution": "",
                                                  "test": "", "entry_point": "f"}) + "\n")
    (tmp_path / "s.jsonl").write_text(json.dumps({"task_id": "a", "completion": "    return x\n"}) + "\n")
    reward.main(["--out_dir", str(tmp_path), "--score", str(tmp_path / "s.jsonl"),
                 "--problems", str(tmp_path / "p.jsonl"), "--device=cpu"])
    row = json.loads((tmp_path / "s_rm.jsonl").read_text())
    expected = reward.score_samples(rm, enc, {"a": {"prompt": "def f(x):\n"}}, [row])[0]
    assert row["completion"] == "    return x\n" and row["rm_score"] == pytest.approx(expected, abs=1e-5)


def test_a_prompt_ranked_twice_keeps_both_rankings_on_one_side_of_the_split(tmp_path, enc):
    sft_model, problems = sft_and_rm_prompts(tmp_path, enc, 4)
    rows = [{"task_id": p["task_id"], "prompt": p["prompt"], "completions": ["    return x\n", "    pass\n", "    x\n"],
             "scores": s} for p in problems for s in ([1.0, 0.0, 0.0], [1.0, 0.5, 0.0])]
    rows.append({**rows[0], "scores": [0.0, 0.0, 0.0]})            # all tied: no comparison
    reward.write_comparisons(tmp_path / "c.jsonl", rows)
    cfg = reward.Config(batch_size=2, holdout=0.25, device="cpu")
    summary = reward.train(cfg, tmp_path, comparisons=[tmp_path / "c.jsonl"])
    assert summary["n_comparisons"] == 3 * (2 + 3) and summary["n_val_comparisons"] == 2 + 3


def test_two_rounds_of_comparisons_merge_with_tags_and_keep_one_heldout_split(tmp_path, enc):
    """The flywheel: round 2 trains on round 1's comparisons plus its own (tags kept), writes
    rm_r2.pt, and holds out the same prompts as round 1 (the split is by prompt, over the rm split)."""
    sft_model, problems = sft_and_rm_prompts(tmp_path, enc, 20)
    one = [{"task_id": p["task_id"], "prompt": p["prompt"], "completions": ["    return x\n", "    pass\n"],
            "scores": [1.0, 0.0], "round": 1, "policy": "sft.pt"} for p in problems[:12]]  # 12 prompts ranked
    two = [{"task_id": p["task_id"], "prompt": p["prompt"], "completions": ["    return x\n", "    x\n", "    pass\n"],
            "scores": [1.0, 0.5, 0.0], "round": 2, "policy": "ppo.pt"} for p in problems[6:]]  # 14, 6 shared
    reward.write_comparisons(tmp_path / "c1.jsonl", one)
    reward.write_comparisons(tmp_path / "c2.jsonl", two)
    assert reward.read_comparisons(tmp_path / "c2.jsonl") == two  # the tags survive the file
    s1 = reward.train(reward.Config(holdout=0.25, device="cpu"), tmp_path, comparisons=[tmp_path / "c1.jsonl"])
    s2 = reward.train(reward.Config(holdout=0.25, device="cpu", round=2), tmp_path,
                      comparisons=[tmp_path / "c1.jsonl", tmp_path / "c2.jsonl"])
    held1 = torch.load(tmp_path / "rm.pt", weights_only=False)["heldout"]
    held2 = torch.load(tmp_path / "rm_r2.pt", weights_only=False)["heldout"]
    assert held1 == held2 and len(held1) == 5              # 25% of the 20 rm prompts, in both rounds
    n1 = sum(1 for r in one if r["task_id"] not in held1)
    n2 = sum(3 for r in two if r["task_id"] not in held1)
    assert s1["n_comparisons"] == n1 and s2["n_comparisons"] == n1 + n2
    rounds = json.loads((tmp_path / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert [r["n_comparisons"] for r in rounds] == [n1, n1 + n2]
