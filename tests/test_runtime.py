"""The runtime plumbing behind the CUDA and DDP code paths, checked on the CPU: DDP ranks that agree
on when to stop, stages that run on rank 0 only under torchrun, the pinned batch, MFU over every GPU,
a resume that reads the checkpoint on the CPU, the mean loss logged every log_interval, PPO's refusal
of top_p < 1 and results.json updates from stages running side by side."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import ppo
import pretrain

ROOT = Path(__file__).resolve().parents[1]


from test_pretrain import out_dir  # noqa: E402,F401  (the same miniature corpus: tokenizer + code .bin)


def tiny_pretrain(**kw):
    base = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=4, grad_accum=2, max_iters=8,
                warmup_iters=2, eval_interval=8, eval_iters=2, lr=3e-3, device="cpu")
    base.update(kw)
    return pretrain.Config(**base)


def torchrun(script, args, tmp_path, timeout=180):
    """Run `script` under torchrun with 2 CPU processes (gloo); returns the CompletedProcess. On a
    timeout (a hang) the whole process group goes, workers included, and the test fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"torchrun {script.name} did not finish in {timeout}s (a collective hang?)")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# ----------------------------------------------------------------------------- DDP: stop together

SKEWED_CLOCK = r"""
import os, sys, time, types
import pretrain
if os.environ["RANK"] == "1":  # this rank's clock runs 1000 s ahead after its first reading
    calls = [0]
    def skewed():
        calls[0] += 1
        return time.time() + (1000.0 if calls[0] > 1 else 0.0)
    pretrain.time = types.SimpleNamespace(time=skewed)
pretrain.main(sys.argv[1:])
"""


def test_ddp_ranks_stop_at_the_same_step_when_their_clocks_disagree(out_dir, tmp_path):
    """--max_seconds under DDP: rank 1 believes time is up after the first step, rank 0 does not.
    Deciding from each rank's own clock, rank 1 would evaluate and enter the checkpoint's
    all_gather while rank 0 is in the next step's gradient all-reduce (a hang); decided together,
    both ranks stop after step 1 and one checkpoint is written."""
    work = tmp_path / "out"
    work.mkdir()
    for name in ("tokenizer.json", "code"):
        (work / name).symlink_to(out_dir / name)
    script = tmp_path / "skewed.py"
    script.write_text(SKEWED_CLOCK)
    cfg = ["--out_dir", work, "--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
           "--batch_size=2", "--max_iters=50", "--eval_interval=50", "--eval_iters=1", "--max_seconds=500"]
    run = torchrun(script, cfg, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    ckpt = torch.load(work / "base.pt", weights_only=False)
    assert ckpt["step"] == 1 and len(ckpt["rng"]) == 2
    rows = (work / "logs" / "pretrain.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [0]


def test_any_rank_without_ddp_is_the_flag():
    rt = common.setup_runtime("cpu")
    assert common.any_rank(True, rt) is True and common.any_rank(0, rt) is False


# ----------------------------------------------------------------------------- one process under torchrun

def test_rank0_only_exits_other_ranks_and_runs_rank_0_alone(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SystemExit) as e:
        common.rank0_only("sft.py")
    assert e.value.code == 0 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    common.rank0_only("sft.py")
    assert "sft.py runs on one process" in capsys.readouterr().err
    assert "RANK" not in os.environ and "WORLD_SIZE" not in os.environ
    assert not common.setup_runtime("cpu").ddp  # so no process group is started


def test_evaluate_under_torchrun_runs_once(tmp_path):
    """A non-DDP stage under torchrun: rank 0 does the job, rank 1 exits, the note is printed once."""
    problem = {"task_id": "t/0", "prompt": "def f(x):\n", "canonical_solution": "    return x\n",
               "test": "def check(c):\n    assert c(2) == 2\n", "entry_point": "f"}
    (tmp_path / "p.jsonl").write_text(json.dumps(problem) + "\n")
    (tmp_path / "s.jsonl").write_text(json.dumps({"task_id": "t/0", "completion": "    return x\n"}) + "\n")
    run = torchrun(ROOT / "evaluate.py", ["--problems", "p.jsonl", "--samples", "s.jsonl", "--k=1",
                                          "--workers=1"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("pass@1: 1.0000") == 1
    assert run.stderr.count("evaluate.py runs on one process") == 1


# ----------------------------------------------------------------------------- the batch, MFU, resume

def test_get_batch_slices_one_contiguous_batch(out_dir):
    tokens = common.load_code_tokens(out_dir / "code", "train")
    x, y = common.get_batch(tokens, 3, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (3, 16) and x.dtype == torch.long
    assert x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()  # views of one batch
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_get_batch_pins_the_whole_contiguous_batch_for_cuda(out_dir, monkeypatch):
    """On CUDA the (B, T + 1) batch is pinned while contiguous and copied non-blocking, once; x and
    y are sliced afterwards (faked here: pin_memory and .to record their calls)."""
    calls = []

    def pin_memory(self):
        calls.append(("pin", tuple(self.shape), self.is_contiguous()))
        return self

    def to(self, device, non_blocking=False):
        calls.append(("to", str(device), non_blocking))
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    tokens = common.load_code_tokens(out_dir / "code", "train")
    x, y = common.get_batch(tokens, 3, 16, torch.Generator().manual_seed(0), device="cuda:0")
    assert calls == [("pin", (3, 17), True), ("to", "cuda:0", True)]
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_mfu_is_over_the_peak_of_every_gpu():
    # 2 GPUs of peak 1e15 FLOP/s; 1e9 FLOPs per token at 3e5 tokens/s summed over both ranks:
    # 3e14 FLOP/s achieved out of 2e15 -> 15% (not 30%)
    assert common.mfu(1e9, 3e5, 1e15, world_size=2) == pytest.approx(0.15)
    assert common.mfu(1e9, 3e5, 1e15) == pytest.approx(0.30)


def test_resume_reads_the_checkpoint_on_the_cpu(out_dir, monkeypatch):
    pretrain.train(tiny_pretrain(max_iters=4), out_dir, stop_at=2)
    devices = []
    real = pretrain.load_checkpoint

    def spy(path, device="cpu", head=None):
        devices.append(device)
        return real(path, device, head)

    monkeypatch.setattr(pretrain, "load_checkpoint", spy)
    resumed = pretrain.train(tiny_pretrain(max_iters=4), out_dir, resume=True)
    assert devices == ["cpu"] and [s for s, _ in resumed] == [2, 3]


# ----------------------------------------------------------------------------- logging

def test_pretrain_logs_the_mean_loss_every_log_interval(out_dir):
    every = pretrain.train(tiny_pretrain(), out_dir)
    sparse = pretrain.train(tiny_pretrain(log_interval=4), out_dir)
    assert [s for s, _ in sparse] == [3, 7]
    for (step, loss), chunk in zip(sparse, (every[0:4], every[4:8])):
        assert loss == pytest.approx(np.mean([l for _, l in chunk]), rel=1e-5)
    rows = [json.loads(r) for r in (out_dir / "logs" / "pretrain.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 7]


# ----------------------------------------------------------------------------- PPO samples at top_p 1

def test_ppo_refuses_top_p_below_one(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ppo.main(["--out_dir", str(tmp_path), "--top_p=0.95"])
    err = capsys.readouterr().err
    assert "--top_p=0.95" in err and "off-policy" in err and len(err.strip().splitlines()) == 1


def test_results_json_updates_from_stages_at_the_same_time_all_land(tmp_path):
    """run.sh's lanes run stages side by side, each merging its figures into results.json: with the
    lock, no read-merge-write overwrites another's (4 processes x 25 keys + a shared counter)."""
    code = ("import common, sys\n"
            "for i in range(25):\n"
            "    common.update_results(sys.argv[1], {'models': {f'{sys.argv[2]}_{i}': {'pass@1': i}}})\n"
            "    common.add_seconds(sys.argv[1], 'evaluate', 1)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), f"m{j}"], cwd=ROOT) for j in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["models"]) == 100 and results["seconds"]["evaluate"] == 100
