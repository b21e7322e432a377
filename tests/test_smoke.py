"""`bash run.sh small --smoke`: every stage of the chain with the small preset's code paths and shapes
(vocabulary 16384, block_size 512, max_new_tokens 256 / 128, K = 8, PPO batch a multiple of its
minibatch, 8 sandbox workers), steps and data shrunk so that a 2-core CPU runs it in minutes."""
import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import run_sh_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_run_sh_small_smoke(tmp_path):
    out = tmp_path / "small_smoke"
    env = run_sh_env(FLYWHEEL_OUT=out)
    run = subprocess.run(["bash", "run.sh", "small", "--smoke"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["preset"] == "small" and results["tokenizer"]["vocab_size"] == 16384
    assert set(results["models"]) == {"base", "sft", "ppo", "ppo_ptx", "ppo_exec"}
    for name, m in results["models"].items():
        assert 0.0 <= m["pass@1"] <= 1.0 and m["val_loss"] > 0, name
    assert {"kl", "rm_score"} <= set(results["models"]["ppo"])
    assert results["reward_model"]["n_comparisons"] > 0
    assert set(results["seconds"]) == {"tokenizer", "pretrain", "evaluate", "sft", "reward", "ppo", "total"}
    # the small preset's shapes
    base = torch.load(out / "base.pt", weights_only=False)
    assert base["model_config"]["block_size"] == 512 and base["model_config"]["vocab_size"] == 16384
    assert base["config"]["grad_accum"] == 4 and base["config"]["log_interval"] == 10
    sft_cfg = torch.load(out / "sft.pt", weights_only=False)["config"]
    assert sft_cfg["max_new_tokens"] == 256 and sft_cfg["batch_size"] == 32
    rm_cfg = torch.load(out / "rm.pt", weights_only=False)["config"]
    assert rm_cfg["k"] == 8 and rm_cfg["max_new_tokens"] == 256 and rm_cfg["batch_size"] == 16
    rows = [json.loads(line) for line in (out / "comparisons.jsonl").read_text().splitlines()]
    assert all(len(r["completions"]) == 8 + 1 for r in rows)  # K samples + the reference (--references)
    ppo_cfg = torch.load(out / "ppo_ptx.pt", weights_only=False)["config"]
    assert ppo_cfg["max_new_tokens"] == 128 and ppo_cfg["workers"] == 8 and ppo_cfg["ptx_block_size"] == 256
    assert ppo_cfg["batch_size"] % ppo_cfg["minibatch_size"] == 0 and ppo_cfg["ptx_coef"] > 0
    exec_cfg = torch.load(out / "ppo_exec.pt", weights_only=False)["config"]
    assert exec_cfg["reward"] == "exec" and exec_cfg["ptx_coef"] == 0 and exec_cfg["samples_per_prompt"] == 4
    assert results["models"]["ppo_exec"]["climb"]["of"] == "gold_frac"
    samples = [json.loads(line) for line in (out / "eval" / "ppo_ptx_samples.jsonl").read_text().splitlines()]
    assert samples and all("completion" in s for s in samples)
    print(f"run.sh small --smoke: {results['seconds']}")
