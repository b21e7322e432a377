import json

import numpy as np
import pytest
import torch

import sft
import tokenizer as tok
from model import GPT, GPTConfig, load_checkpoint, save_checkpoint
from sft import collate, encode_example, masked_lm_loss

TEXTS = ["def add(a, b):\n    return a + b\n", "def neg(x):\n    \"\"\"Negate x.\"\"\"\n    return -x\n"] * 20


@pytest.fixture(scope="module")
def enc():
    return tok.train(TEXTS, 300)


def test_masked_lm_loss_is_the_mean_over_unmasked_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[1, 2, 3], [4, 0, 1]])
    mask = torch.tensor([[False, True, True], [True, False, False]])
    logp = logits.log_softmax(-1)
    expected = -(logp[0, 1, 2] + logp[0, 2, 3] + logp[1, 0, 4]) / 3
    assert torch.allclose(masked_lm_loss(logits, targets, mask), expected)


def test_masked_lm_loss_ignores_masked_targets_and_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    targets = torch.randint(0, 7, (2, 4))
    mask = torch.tensor([[False, False, True, True], [False, True, True, False]])
    base = masked_lm_loss(logits, targets, mask)
    t2, l2 = targets.clone(), logits.clone()
    t2[~mask] = -1                               # the -1 convention, or any other id
    l2[~mask] = torch.randn_like(l2[~mask]) * 100
    assert torch.allclose(masked_lm_loss(l2, t2, mask), base)
    t2[~mask] = 6
    assert torch.allclose(masked_lm_loss(logits, t2, mask), base)


def test_all_masked_batch_is_finite_with_zero_gradient():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss = masked_lm_loss(logits, torch.full((2, 3), -1), torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_collate_trains_on_completion_and_eot_only(enc):
    eot, pad = tok.special_ids(enc)
    a = encode_example(enc, "def f(x):\n", "    return x\n", eot)
    b = encode_example(enc, "def add(a, b):\n    \"\"\"Add.\"\"\"\n", "    return a + b\n", eot)
    x, y, m = collate([a, b], pad)
    for row, (tokens, n_prompt) in enumerate([a, b]):
        n = len(tokens) - 1
        assert x[row, :n].tolist() == tokens[:-1]
        assert (x[row, n:] == pad).all()                     # right padding
        assert y[row].tolist()[n_prompt - 1:n] == tokens[n_prompt:]  # completion + eot
        assert tokens[-1] == eot and y[row, n - 1] == eot
        assert (y[row, :n_prompt - 1] == -1).all() and (y[row, n:] == -1).all()
    assert torch.equal(m, y != -1)
    # prompt and completion tokenized separately, as at sampling time
    assert a[0][:a[1]] == enc.encode_ordinary("def f(x):\n")


def test_sft_loss_of_a_row_does_not_depend_on_padding(enc):
    """Right padding after a row (any length, any pad id) leaves that row's loss unchanged."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()
    eot, pad = tok.special_ids(enc)
    short = encode_example(enc, "def f(x):\n", "    return x\n", eot)
    long = encode_example(enc, "def add(a, b):\n    \"\"\"Add a and b.\"\"\"\n", "    return a + b + 0\n", eot)
    losses = []
    for pad_id, batch in ((pad, [short]), (pad, [short, long]), (eot, [short, long])):
        x, y, m = collate(batch, pad_id)
        logits, _ = model(x)
        losses.append(masked_lm_loss(logits[:1], y[:1], m[:1]))
    assert torch.allclose(losses[0], losses[1], atol=1e-6) and torch.allclose(losses[0], losses[2], atol=1e-6)


def test_loss_from_the_masked_positions_logits_equals_the_full_logits(enc):
    """What training does, model(x, logits_at=mask) (logits at the completion tokens only), gives
    the loss and the gradients of unembedding every position."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=32))
    eot, pad = tok.special_ids(enc)
    batch = [encode_example(enc, "def f(x):\n", "    return x\n", eot),
             encode_example(enc, "def add(a, b):\n    \"\"\"Add.\"\"\"\n", "    return a + b\n", eot)]
    x, y, m = collate(batch, pad)
    results = []
    for kw in ({}, {"logits_at": m}):
        model.zero_grad()
        logits, _ = model(x, **kw)
        assert logits.shape == ((int(m.sum()), enc.n_vocab) if kw else (*x.shape, enc.n_vocab))
        loss = masked_lm_loss(logits, y, m)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (dense, g_dense), (sparse, g_sparse) = results
    assert torch.allclose(dense, sparse, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_dense, g_sparse))


def test_split_holdout_is_deterministic_and_disjoint():
    ids = [f"t/{i}" for i in range(20)]
    train, held = sft.split_holdout(ids, 5, seed=1)
    assert sft.split_holdout(list(reversed(ids)), 5, seed=1) == (train, held)
    assert len(held) == 5 and not set(train) & set(held) and set(train) | set(held) == set(ids)
    assert len(sft.split_holdout(ids, 100, seed=1)[1]) == 10   # never more than half


def write_problems(path, n):
    rows = [{"task_id": f"t/{i}", "prompt": f"def f{i}(x):\n", "canonical_solution": f"    return x + {i}\n",
             "test": f"def check(candidate):\n    assert candidate(1) == {1 + i}\n", "entry_point": f"f{i}"}
            for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_sft_end_to_end_writes_a_checkpoint(tmp_path, enc, monkeypatch):
    """A micro run: base.pt + tasks/sft.jsonl -> sft.pt (stage "sft"), loss goes down."""
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=32))
    save_checkpoint(tmp_path / "base.pt", base, tokenizer=tok.to_state(enc), stage="pretrain", step=0)
    write_problems(tmp_path / "tasks" / "sft.jsonl", 24)
    monkeypatch.setattr(sft, "pass_at_1", lambda *a, **k: 0.0)  # no sandbox needed here
    code = tmp_path / "code"                                     # pretraining tokens for ptx_coef
    code.mkdir()
    np.random.default_rng(0).integers(0, enc.n_vocab, 5000).astype(np.uint16).tofile(code / "train.bin")
    cfg = sft.Config(epochs=3, batch_size=4, lr=3e-3, warmup_iters=2, holdout=4, device="cpu",
                     max_new_tokens=8, ptx_coef=0.1)
    summary = sft.train(cfg, tmp_path)
    model, ckpt = load_checkpoint(tmp_path / "sft.pt")
    assert ckpt["stage"] == "sft" and ckpt["step"] == summary["steps"] == 3 * 5
    assert ckpt["tokenizer"] == tok.to_state(enc)
    log = [json.loads(line) for line in (tmp_path / "logs" / "sft.jsonl").read_text().splitlines()]
    evals = [r for r in log if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]


def test_missing_base_checkpoint_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sft.main(["--out_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert "base.pt not found" in err and len(err.strip().splitlines()) == 1


def test_sample_completions_keeps_prompt_order_and_matches_unbatched(enc):
    import engine
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()
    prompts = ["def add(a, b):\n    \"\"\"Add a and b.\"\"\"\n", "def f(x):\n", "def neg(x):\n"]
    batched = engine.sample_completions(model, enc, prompts, 12, temperature=0.0, batch_size=2)
    alone = [engine.sample_completions(model, enc, [p], 12, temperature=0.0)[0] for p in prompts]
    assert [b["completion"] for b in batched] == [a["completion"] for a in alone]
    assert [b["sum_logprob"] for b in batched] == pytest.approx([a["sum_logprob"] for a in alone], abs=1e-4)
    assert all(not any(s in b["completion"] for s in engine.STOP) for b in batched)  # cut before the stop sequences
