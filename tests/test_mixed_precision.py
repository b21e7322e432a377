"""The CUDA code paths that a CPU can run: bf16 autocast (`--dtype=bfloat16 --device=cpu`) through a
training step of every stage, sampling and scoring included, and `--compile=true` pretraining.

One miniature chain, module-scoped: pretrain -> sft -> reward (sampling, labelling, training) -> ppo
-> evaluate, every stage under CPU bf16 autocast. CPUs without native bf16 matmuls emulate them
(~20x slower than fp32 here), so every size is tiny.
"""
import inspect
import json
import math

import numpy as np
import pytest
import torch

import common
import evaluate
import model as M
import ppo
import pretrain
import reward
import sft
from data import tasks
from conftest import make_code_dir

BF16 = dict(device="cpu", dtype="bfloat16")


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    """A miniature out/<preset>/: tokenizer, code .bin files and the four task splits."""
    out = tmp_path_factory.mktemp("out")
    text = "".join(inspect.getsource(m) for m in (common, pretrain, sft, reward))
    make_code_dir(out, text, vocab_size=512)
    tasks.main(["--out_dir", str(out), "--n_sft=12", "--n_rm=6", "--n_ppo=4", "--n_test=2"])
    return out


@pytest.fixture(scope="module")
def pretrained(out_dir):
    cfg = pretrain.Config(n_layer=1, n_head=2, n_embd=32, block_size=256, batch_size=2, grad_accum=2,
                          max_iters=3, warmup_iters=1, eval_interval=3, eval_iters=1, **BF16)
    return pretrain.train(cfg, out_dir)


@pytest.fixture(scope="module")
def finetuned(pretrained, out_dir):
    cfg = sft.Config(epochs=1, batch_size=4, holdout=2, max_new_tokens=8, eval_at_start=False, **BF16)
    return sft.train(cfg, out_dir)


@pytest.fixture(scope="module")
def rewarded(finetuned, out_dir):
    cfg = reward.Config(k=2, max_new_tokens=8, batch_size=2, holdout=0.2, references=True, **BF16)
    return reward.train(cfg, out_dir)


def test_bfloat16_is_accepted_on_the_cpu_and_float16_refused(capsys):
    rt = common.setup_runtime("cpu", "bfloat16")
    with rt.ctx():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert common.setup_runtime("cpu", "auto").ctx().__class__.__name__ == "nullcontext"
    for bad in ("float16", "half"):
        with pytest.raises(SystemExit):
            common.setup_runtime("cpu", bad)
        err = capsys.readouterr().err
        assert err.startswith("error: --dtype=") and len(err.strip().splitlines()) == 1


def test_float16_is_refused_by_a_stage_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sft.main(["--out_dir", str(tmp_path), "--dtype=float16"])
    err = capsys.readouterr().err
    assert "--dtype=float16 is not supported" in err and len(err.strip().splitlines()) == 1


def test_pretrain_step_under_bf16_autocast(pretrained, out_dir):
    assert [s for s, _ in pretrained] == [0, 1, 2] and all(math.isfinite(l) for _, l in pretrained)
    model, ckpt = M.load_checkpoint(out_dir / "base.pt")
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: fp32 master weights
    assert ckpt["config"]["dtype"] == "bfloat16" and math.isfinite(ckpt["val_loss"])


def test_sft_step_and_greedy_sampling_under_bf16_autocast(finetuned, out_dir):
    assert finetuned["steps"] == 3 and math.isfinite(finetuned["val_loss"])
    assert 0.0 <= finetuned["val_pass@1"] <= 1.0  # held-out problems sampled and executed
    log = [json.loads(line) for line in (out_dir / "logs" / "sft.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in log if "loss" in r)


def test_reward_sampling_labelling_and_step_under_bf16_autocast(rewarded, out_dir):
    rows = reward.read_comparisons(out_dir / "comparisons.jsonl")
    assert len(rows) == 6 and all(len(r["completions"]) == 2 + 1 for r in rows)  # K samples + reference
    problems = tasks.read_problems(out_dir / "tasks" / "rm.jsonl")
    assert all(r["completions"][-1] == problems[r["task_id"]]["canonical_solution"] for r in rows)
    assert all(r["scores"][-1] == 1.0 for r in rows)  # the labeler executed the reference: it passes
    assert rewarded["n_comparisons"] > 0 and 0.0 <= rewarded["val_accuracy"] <= 1.0
    rm, ckpt = M.load_checkpoint(out_dir / "rm.pt")
    assert rm.config.head == "scalar" and ckpt["config"]["references"] is True


def test_ppo_iteration_under_bf16_autocast(rewarded, out_dir):
    cfg = ppo.Config(iterations=1, batch_size=4, minibatch_size=2, max_new_tokens=8, ptx_coef=0.3,
                     ptx_batch_size=2, ptx_block_size=32, eval_iters=1, gold=True, workers=1,
                     run_name="ppo_bf16", **BF16)
    (row,) = ppo.train(cfg, out_dir)
    for key in ("rm_score", "kl", "pg_loss", "vf_loss", "ptx_loss", "approx_kl", "grad_norm", "entropy"):
        assert math.isfinite(row[key]), key
    assert 0.0 <= row["gold_pass"] <= 1.0


def test_evaluate_samples_and_scores_under_bf16_autocast(rewarded, out_dir):
    summary = evaluate.main(["--out_dir", str(out_dir), "--ckpt", str(out_dir / "sft.pt"),
                             "--problems", str(out_dir / "tasks" / "test.jsonl"), "--rm", str(out_dir / "rm.pt"),
                             "--n=2", "--max_new_tokens=8", "--k=1", "--val_iters=1", "--val_batch_size=2",
                             "--workers=1", "--device=cpu", "--dtype=bfloat16"])
    assert 0.0 <= summary["pass@1"] <= 1.0 and math.isfinite(summary["val_loss"])
    rows = tasks.read_jsonl(out_dir / "eval" / "sft_samples.jsonl")
    assert len(rows) == 4 and all(math.isfinite(r["rm_score"]) for r in rows)


# ----------------------------------------------------------------------------- torch.compile

@pytest.mark.slow  # inductor compiles the forward and backward kernels with gcc: minutes on 2 cores
def test_compiled_pretraining_matches_eager(out_dir):
    """`--compile=true` on the CPU (inductor): the same losses as eager, and a checkpoint that loads
    as a plain model (the compile wrapper is not saved)."""
    base = dict(n_layer=1, n_head=2, n_embd=32, block_size=64, batch_size=2, grad_accum=2, max_iters=3,
                warmup_iters=1, eval_interval=3, eval_iters=1, device="cpu")
    work = out_dir / "compile_run"  # its own base.pt, so the chain's is left alone
    work.mkdir(exist_ok=True)
    for name in ("tokenizer.json", "code"):
        if not (work / name).exists():
            (work / name).symlink_to(out_dir / name)
    eager = pretrain.train(pretrain.Config(**base), work)
    torch._dynamo.reset()
    compiled = pretrain.train(pretrain.Config(**base, compile=True), work)
    assert [s for s, _ in compiled] == [s for s, _ in eager]
    assert np.allclose([l for _, l in compiled], [l for _, l in eager], rtol=1e-4, atol=1e-4)
    model, ckpt = M.load_checkpoint(work / "base.pt")
    assert ckpt["config"]["compile"] is True and not any(k.startswith("_orig_mod") for k in ckpt["model"])
