"""run.sh's resumable, multi-round chain.

Fast (default suite): run.sh's own logic, with a stand-in `python` first on PATH that records each
stage's command line and writes the files the next stages look for; run.sh's inline `python -c` /
`python -` snippets (results.json bookkeeping) run with the real interpreter. Checked: the flywheel
arguments of rounds 2 and 3, the stamps, `--resume` skipping finished stages and passing `--resume`
to pretrain / PPO only where their checkpoint exists, a crashed stage left unstamped and rerun, a
fresh start ignoring old stamps and checkpoints.

Slow: the real chain, `tiny --smoke` (the cheapest preset), in one out dir: a 1-round run, then a
`--resume --rounds 2` that must run only round 2's stages and in which round 2's evaluation is made
to fail, then a `--resume` after deleting the `eval_ppo` stamp that must rerun exactly eval_ppo and
the failed eval_ppo_r2."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_sh_env

ROOT = Path(__file__).resolve().parents[1]

ROUND1 = ["corpus", "tokenizer", "tokenize", "tasks", "pretrain", "eval_base", "sft", "eval_sft", "reward",
          "rm_picks", "ppo_exec", "eval_ppo_exec", "ppo", "eval_ppo", "ppo_ptx", "eval_ppo_ptx"]


def round_stages(r):
    return [f"reward_r{r}", f"ppo_r{r}", f"eval_ppo_r{r}"]


def skipped(stdout):
    """The stage names run.sh reported as skipped, in order."""
    return [line.split("] ", 1)[1].split(":")[0] for line in stdout.splitlines()
            if line.startswith("=== [") and line.endswith("done, skipped (--resume)")]


# ----------------------------------------------------------------------------- run.sh's logic, fast

FAKE_PYTHON = r'''#!@REAL@ -S
"""A stand-in for `python` in run.sh: the real interpreter for -c / - / -m, otherwise a record of the
stage's command line (to $FAKE_LOG, when it starts and again when it ends) and the files the next
stages read. $FAKE_SLEEP: seconds each ppo.py, reward.py and sampling evaluate.py takes."""
import json, os, sys, time
REAL = '@REAL@'
argv = sys.argv[1:]
if not argv or argv[0].startswith("-"):
    os.execv(REAL, [REAL, "-S"] + argv)  # -S: no site-packages (3x faster start)
script, args = argv[0], argv[1:]
if "--print_vocab_size" in args:
    print(4096)
    sys.exit(0)

def opt(name):
    for i, a in enumerate(args):
        if a == "--" + name:
            return args[i + 1]
        if a.startswith("--" + name + "="):
            return a.split("=", 1)[1]

def record(cmd):
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps(cmd) + "\n")

record([script] + args)
if os.environ.get("FAKE_FAIL") and os.environ["FAKE_FAIL"] in " ".join(argv):
    sys.exit("fake crash: " + os.environ["FAKE_FAIL"])
out = opt("out_dir")

def touch(name):
    open(os.path.join(out, name), "w").close()

if script == "tokenizer.py":
    with open(opt("report"), "w") as f:
        json.dump({"vocab_size": 4096, "bytes_per_token": 3.5, "bytes_per_token_no_ws": 2.0}, f)
elif script == "pretrain.py":
    touch("base.pt")
elif script == "sft.py":
    touch("sft.pt")
elif script == "reward.py":
    time.sleep(float(os.environ.get("FAKE_SLEEP") or 0))
    r = int(opt("round") or 1)
    touch("rm.pt" if r == 1 else f"rm_r{r}.pt")
    touch("comparisons.jsonl" if r == 1 else f"comparisons_r{r}.jsonl")
elif script == "ppo.py":
    time.sleep(float(os.environ.get("FAKE_SLEEP") or 0))
    touch(opt("run_name") + ".pt")
elif script == "evaluate.py" and opt("model_name"):  # (as the real one: under results.json's lock)
    time.sleep(float(os.environ.get("FAKE_SLEEP") or 0) if opt("ckpt") else 0)
    sys.path.insert(0, os.getcwd())
    import common
    common.update_results(out, {"models": {opt("model_name"): {"pass@1": 0.25}}})
record(["end", script] + args)
'''


@pytest.fixture
def fake_run(tmp_path):
    """run(*args, fail=None) -> (returncode, output, [recorded stage command lines])."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python"
    fake.write_text(FAKE_PYTHON.replace("@REAL@", sys.executable))
    fake.chmod(0o755)
    out, log = tmp_path / "out", tmp_path / "log.jsonl"

    def run(*args, fail=None, sleep=0):
        log.write_text("")
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FLYWHEEL_OUT": str(out),
               "FAKE_LOG": str(log), "FAKE_FAIL": fail or "", "FAKE_SLEEP": str(sleep)}
        p = subprocess.run(["bash", "run.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
        return p.returncode, p.stdout + p.stderr, [json.loads(line) for line in log.read_text().splitlines()]
    run.out = out
    return run


def stage_name(cmd):
    """The stage (as run.sh's stamps) of a recorded command line, None for the evidence and table."""
    script, args = cmd[0], cmd[1:]
    opt = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if "=" in a}
    rnd = int(opt.get("--round", 1))
    if script == "data/code.py":
        return "tokenize" if "--tokenize" in args else "corpus"
    if script == "evaluate.py":
        if "--rm" in args and "--ckpt" not in args:
            return "rm_picks"
        return "eval_" + args[args.index("--model_name") + 1] if "--model_name" in args else None
    if script == "ppo.py":
        return opt["--run_name"]
    if script == "report.py":
        return None
    if script == "reward.py":
        return "reward" if rnd == 1 else f"reward_r{rnd}"
    return Path(script).stem


def by_stage(cmds):
    """{stage name: command line} of recorded commands, in the order they started."""
    names = {}
    for cmd in cmds:
        name = None if cmd[0] == "end" else stage_name(cmd)
        if name is not None:
            assert name not in names, f"{name} ran twice"
            names[name] = cmd[1:]
    return names


# the stages each stage reads from: it may start only once they have ended (lanes run the others side
# by side); round r >= 2 starts after every stage of round r - 1
NEEDS = {"tokenizer": ["corpus"], "tokenize": ["tokenizer"], "pretrain": ["tokenize"],
         "eval_base": ["pretrain", "tasks"], "sft": ["pretrain", "tasks"], "reward": ["sft"],
         "eval_sft": ["sft"], "rm_picks": ["reward", "eval_sft"], "ppo": ["reward"], "eval_ppo": ["ppo"],
         "ppo_ptx": ["reward"], "eval_ppo_ptx": ["ppo_ptx"], "ppo_exec": ["reward"],
         "eval_ppo_exec": ["ppo_exec"]}


def round_of(name):
    m = re.search(r"_r(\d+)$", name)
    return int(m.group(1)) if m else 1


def spans(cmds):
    """({stage: index of the record of its start}, {stage: index of the record of its end})."""
    start, end = {}, {}
    for i, cmd in enumerate(cmds):
        if cmd[0] == "end":
            end[stage_name(cmd[1:])] = i
        else:
            start[stage_name(cmd)] = i
    return start, end


def check_order(cmds):
    """Each stage started after every stage it needs had ended."""
    start, end = spans(cmds)
    for name, i in start.items():
        if name is None:
            continue
        r = round_of(name)
        if r == 1:
            needs = NEEDS.get(name, [])
        else:
            needs = {"reward": [n for n in start if n and round_of(n) == r - 1],
                     "ppo": [f"reward_r{r}"], "eval_ppo": [f"ppo_r{r}"]}[name.rsplit("_r", 1)[0]]
        for need in needs:
            if need in start:
                assert end[need] < i, f"{name} started before {need} ended"


def test_usage_errors():
    for args in (["--rounds", "0"], ["--rounds"], ["--rounds=x"], ["huge"], ["--resum"], ["--jobs", "3"]):
        p = subprocess.run(["bash", "run.sh", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and "usage" in p.stderr, args


def test_rounds_arguments_stamps_and_results(fake_run):
    rc, output, cmds = fake_run("tiny", "--rounds", "3")
    assert rc == 0, output[-3000:]
    out = fake_run.out
    stages = by_stage(cmds)
    assert sorted(stages) == sorted(ROUND1 + round_stages(2) + round_stages(3))
    check_order(cmds)
    assert not any("--resume" in args for args in stages.values())
    assert sorted(p.name for p in (out / "done").iterdir()) == sorted(stages)
    # round 2 samples from round 1's PPO policy and keeps round 1's comparisons; round 3 from round 2's
    for r, prev in ((2, ""), (3, "_r2")):
        args = stages[f"reward_r{r}"]
        cmps = ",".join([f"{out}/comparisons.jsonl"] + [f"{out}/comparisons_r{q}.jsonl" for q in range(2, r)])
        assert "--references" not in args  # (--smoke only)
        assert {f"--round={r}", f"--policy={out}/ppo{prev}.pt", f"--prev_rm={out}/rm{prev}.pt"} <= set(args)
        assert args[args.index("--comparisons") + 1] == cmps
        args = stages[f"ppo_r{r}"]
        assert {"--ptx_coef=0", f"--run_name=ppo_r{r}", f"--init={out}/ppo{prev}.pt", f"--ref={out}/sft.pt",
                f"--rm={out}/rm_r{r}.pt"} <= set(args)
        assert stages[f"eval_ppo_r{r}"][stages[f"eval_ppo_r{r}"].index("--ckpt") + 1] == f"{out}/ppo_r{r}.pt"
    results = json.loads((out / "results.json").read_text())
    assert [e["round"] for e in results["rounds"]] == [1, 2, 3]
    assert all(e["policy"]["pass@1"] == 0.25 for e in results["rounds"])
    assert results["seconds"]["total"] >= 0 and {"reward", "ppo", "evaluate"} <= set(results["seconds"])


def test_resume_skips_finished_stages_and_reruns_a_crashed_one(fake_run):
    out = fake_run.out
    # a crash in round 2's PPO: the stages before it are stamped, it and the later ones are not
    rc, output, cmds = fake_run("tiny", "--rounds", "2", fail="--run_name=ppo_r2")
    assert rc != 0 and "fake crash" in output
    assert sorted(by_stage(cmds)) == sorted(ROUND1 + ["reward_r2", "ppo_r2"])
    assert sorted(p.name for p in (out / "done").iterdir()) == sorted(ROUND1 + ["reward_r2"])
    assert "total" in json.loads((out / "results.json").read_text())["seconds"]  # a crashed run's time counts
    (out / "ppo_r2.pt").touch()  # the checkpoint the crashed run left
    # --resume: exactly the unstamped stages run; PPO continues from its checkpoint
    rc, output, cmds = fake_run("tiny", "--rounds", "2", "--resume")
    assert rc == 0, output[-3000:]
    stages = by_stage(cmds)
    assert list(stages) == ["ppo_r2", "eval_ppo_r2"] and "--resume" in stages["ppo_r2"]
    assert sorted(skipped(output)) == sorted(ROUND1 + ["reward_r2"])
    assert [e["round"] for e in json.loads((out / "results.json").read_text())["rounds"]] == [1, 2]
    # a deleted stamp: that stage reruns (pretrain with --resume: base.pt is there), the stamped ones do not
    for name in ("pretrain", "eval_ppo"):
        (out / "done" / name).unlink()
    rc, output, cmds = fake_run("tiny", "--rounds", "2", "--resume")
    assert rc == 0, output[-3000:]
    stages = by_stage(cmds)
    assert sorted(stages) == ["eval_ppo", "pretrain"] and "--resume" in stages["pretrain"]
    # all done: a --resume runs nothing; --rounds 3 then runs round 3 alone
    rc, output, cmds = fake_run("tiny", "--rounds", "2", "--resume")
    assert rc == 0 and by_stage(cmds) == {}
    rc, output, cmds = fake_run("tiny", "--rounds", "3", "--resume")
    assert rc == 0 and list(by_stage(cmds)) == round_stages(3)
    # without --resume: a fresh start, though stamps and checkpoints are there
    rc, output, cmds = fake_run("tiny", "--rounds", "2")
    assert rc == 0 and skipped(output) == []
    stages = by_stage(cmds)
    assert sorted(stages) == sorted(ROUND1 + round_stages(2)) and not any("--resume" in a for a in stages.values())
    check_order(cmds)
    assert [e["round"] for e in json.loads((out / "results.json").read_text())["rounds"]] == [1, 2]


def test_lanes_run_side_by_side_and_jobs_1_runs_one_stage_at_a_time(fake_run):
    """PPO on the execution reward overlaps PPO on the RM by default, and SFT's evaluation overlaps the reward stage
    (1 s each here); with --jobs 1 the stages run in the script's order, each after the previous
    one ended."""
    rc, output, cmds = fake_run("tiny", sleep=1)
    assert rc == 0, output[-3000:]
    check_order(cmds)
    start, end = spans(cmds)
    assert start["ppo_exec"] < end["ppo"] and start["ppo"] < end["ppo_exec"]
    assert start["eval_sft"] < end["reward"] and start["reward"] < end["eval_sft"]
    assert "lane exec: done" in output and "=== [ppo] python ppo.py" in output  # the lane's stages, reported
    rc, output, cmds = fake_run("tiny", "--jobs", "1", sleep=0.2)
    assert rc == 0, output[-3000:]
    assert list(by_stage(cmds)) == ROUND1 and "=== lane" not in output
    assert all(cmds[i + 1] == ["end"] + cmd for i, cmd in enumerate(cmds) if cmd[0] != "end")  # one at a time


def test_a_failed_lane_stops_the_run_and_resume_reruns_it(fake_run):
    out = fake_run.out
    rc, output, cmds = fake_run("tiny", fail="--model_name base")
    assert rc != 0 and "lane base failed" in output and "fake crash" in output
    done = sorted(p.name for p in (out / "done").iterdir())
    # the stages beside it and before the next join finished; none after that join started
    assert "eval_base" not in done and {"sft", "eval_sft", "reward"} <= set(done)
    assert "rm_picks" not in by_stage(cmds) and "ppo" not in by_stage(cmds)
    rc, output, cmds = fake_run("tiny", "--resume")
    assert rc == 0 and sorted(by_stage(cmds)) == sorted(["eval_base"] + ROUND1[ROUND1.index("rm_picks"):])


# ----------------------------------------------------------------------------- the real chain, slow

def run_sh(out, *args):
    t = time.time()
    p = subprocess.run(["bash", "run.sh", "tiny", "--smoke", *args], cwd=ROOT, capture_output=True, text=True,
                       env=run_sh_env(FLYWHEEL_OUT=out), timeout=1800)
    print(f"run.sh tiny --smoke {' '.join(args)}: {time.time() - t:.0f}s")
    return p


def ran(stdout):
    """The command lines of the stages that ran."""
    return [line for line in stdout.splitlines() if line.startswith("=== [") and not line.endswith("(--resume)")]


@pytest.mark.slow
def test_tiny_smoke_two_rounds_resumed_and_a_crashed_stage_rerun(tmp_path):
    out = tmp_path / "tiny_smoke"
    # 1. one round. The stages that the rounds do not use are stamped beforehand, so --resume skips them
    #    (it saves ~70 s: ppo_ptx and three evaluations); the other stages run as in a fresh run
    skip = ["eval_base", "eval_sft", "rm_picks", "ppo_ptx", "eval_ppo_ptx"]
    (out / "done").mkdir(parents=True)
    for name in skip:
        (out / "done" / name).touch()
    p = run_sh(out, "--resume")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert sorted(skipped(p.stdout)) == sorted(skip)
    results = json.loads((out / "results.json").read_text())
    assert [e["round"] for e in results["rounds"]] == [1] and "pass@1" in results["rounds"][0]["policy"]
    ckpts = ["base.pt", "sft.pt", "rm.pt", "ppo.pt", "comparisons.jsonl"]
    mtimes = {f: (out / f).stat().st_mtime_ns for f in ckpts}

    # 2. --rounds 2 --resume: only round 2's stages run; round 2's evaluation is made to fail (its
    #    problems file hidden): the run stops there, without that stage's stamp
    test_file = out / "tasks" / "test.jsonl"
    test_file.rename(test_file.with_suffix(".hidden"))
    p = run_sh(out, "--rounds", "2", "--resume")
    assert p.returncode != 0 and "test.jsonl not found" in p.stdout + p.stderr
    assert sorted(skipped(p.stdout)) == sorted(ROUND1)
    assert [line.split("] ")[1].split()[1] for line in ran(p.stdout)] == ["reward.py", "ppo.py", "evaluate.py"]
    assert (out / "done" / "ppo_r2").exists() and not (out / "done" / "eval_ppo_r2").exists()
    assert {f: (out / f).stat().st_mtime_ns for f in ckpts} == mtimes
    rows = [json.loads(line) for line in (out / "comparisons_r2.jsonl").read_text().splitlines()]
    assert rows and all(r["round"] == 2 and r["policy"] == str(out / "ppo.pt") for r in rows)
    assert sum(r["scores"].count(max(r["scores"])) < len(r["scores"]) for r in rows) > 0  # not all ties
    assert (out / "rm_r2.pt").exists() and (out / "ppo_r2.pt").exists()
    ppo_r2 = (out / "ppo_r2.pt").stat().st_mtime_ns

    # 3. the problems back, eval_ppo's stamp deleted: --resume reruns exactly eval_ppo and eval_ppo_r2
    test_file.with_suffix(".hidden").rename(test_file)
    (out / "done" / "eval_ppo").unlink()
    p = run_sh(out, "--rounds", "2", "--resume")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert all(" evaluate.py " in line for line in ran(p.stdout))
    assert [line.rsplit("--model_name ", 1)[1].split()[0] for line in ran(p.stdout)] == ["ppo", "ppo_r2"]
    assert sorted(skipped(p.stdout)) == sorted([s for s in ROUND1 if s != "eval_ppo"] + ["reward_r2", "ppo_r2"])
    assert {f: (out / f).stat().st_mtime_ns for f in ckpts} == mtimes
    assert (out / "ppo_r2.pt").stat().st_mtime_ns == ppo_r2
    assert sorted(p.name for p in (out / "done").iterdir()) == sorted(ROUND1 + round_stages(2))

    results = json.loads((out / "results.json").read_text())
    rounds = results["rounds"]
    assert [e["round"] for e in rounds] == [1, 2]
    for e in rounds:
        assert e["n_comparisons"] > 0 and 0 <= e["rm_val_accuracy"] <= 1, e
        assert 0 <= e["policy"]["pass@1"] <= 1 and {"kl", "rm_score", "val_loss"} <= set(e["policy"]), e
    assert rounds[1]["n_comparisons"] > rounds[0]["n_comparisons"]  # round 2's RM: both rounds' comparisons
    assert {"rm_accuracy_before", "rm_accuracy_after", "n_fresh_val_comparisons"} <= set(rounds[1])
    assert rounds[1]["policy"] == {k: v for k, v in results["models"]["ppo_r2"].items()}
    # every run's time is in the total, the failed one's too (its stages' seconds are in theirs; stages
    # in lanes overlap, so their seconds may add up to more than the total)
    seconds = results["seconds"]
    assert seconds["total"] >= max(v for k, v in seconds.items() if k != "total") > 0
    print(f"seconds: {seconds}")
