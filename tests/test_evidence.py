"""evaluate.py's evidence: bootstrap intervals over problems (Efron), paired differences, the exact
best-of-n estimator (Gao et al. 2022; KL_bon from Stiennon et al. App. G.3), the temperature sweep
and the results.json keys they fill, end to end on a toy model."""
import itertools
import json
import math
import random

import numpy as np
import pytest
import torch

import evaluate
import report
import tokenizer as tok
from evaluate import (best_of_n_table, bootstrap_ci, bootstrap_means, expected_best_of, kl_best_of_n, model_ci,
                      paired_difference, pass_at_k, per_problem_counts, pick_vs_random, versus_tempered)
from model import GPT, GPTConfig, load_checkpoint, save_checkpoint


# ----------------------------------------------------------------------------- bootstrap intervals

def test_all_solved_or_none_solved_is_a_point_interval():
    assert bootstrap_ci(np.ones(50), n_boot=2000) == [1.0, 1.0]
    assert bootstrap_ci(np.zeros(50), n_boot=2000) == [0.0, 0.0]
    counts = {f"t/{i}": (10, 10) for i in range(30)}
    assert model_ci(counts, ks=(1, 10, 100)) == {"pass@1": [1.0, 1.0], "pass@10": [1.0, 1.0]}  # no n >= 100


@pytest.mark.parametrize("p", [0.3, 0.5, 0.85])
def test_binomial_case_matches_the_normal_approximation(p):
    """N problems, one sample each, a fraction p solved: the percentile interval is close to the Wald
    interval p +- 1.96 sqrt(p (1 - p) / N)."""
    n_problems = 400
    values = np.zeros(n_problems)
    values[: round(p * n_problems)] = 1.0
    lo, hi = bootstrap_ci(values, n_boot=10000, seed=1)
    half = 1.96 * math.sqrt(p * (1 - p) / n_problems)
    assert lo == pytest.approx(p - half, abs=0.006) and hi == pytest.approx(p + half, abs=0.006)


def test_bootstrap_is_deterministic_in_its_seed_and_pairs_rows():
    values = np.random.default_rng(0).random(37)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)
    both = bootstrap_means(np.stack([values, 2 * values]), n_boot=500, seed=2)  # same resamples for each row
    assert both.shape == (2, 500) and np.allclose(both[1], 2 * both[0])
    assert np.allclose(both[0], bootstrap_means(values, n_boot=500, seed=2))


def test_paired_difference_of_a_model_with_itself_is_exactly_zero():
    rng = np.random.default_rng(0)
    counts = {f"t/{i}": (10, int(c)) for i, c in enumerate(rng.integers(0, 11, 50))}
    d = paired_difference(counts, dict(reversed(list(counts.items()))), ks=(1, 10))  # order does not matter
    assert d == {"pass@1": 0.0, "ci": [0.0, 0.0], "pass@10": 0.0, "ci@10": [0.0, 0.0]}


def test_paired_difference_values_and_pairing():
    """A model that solves one more sample out of 10 on every problem: +0.1 with a point interval
    (pairing removes all the between-problem variance), while each model's own interval is wide."""
    rng = np.random.default_rng(1)
    b = {f"t/{i}": (10, int(c)) for i, c in enumerate(rng.integers(0, 10, 80))}
    a = {t: (n, c + 1) for t, (n, c) in b.items()}
    d = paired_difference(a, b, ks=(1,))
    assert d["pass@1"] == pytest.approx(0.1) and d["ci"] == pytest.approx([0.1, 0.1])
    lo, hi = model_ci(a, ks=(1,))["pass@1"]
    assert hi - lo > 0.1
    assert evaluate.is_real(d) and not evaluate.is_real({"pass@1": 0.02, "ci": [-0.01, 0.05]})


def test_pairing_needs_the_same_problems():
    a = {"t/0": (2, 1), "t/1": (2, 0)}
    with pytest.raises(ValueError, match="different problems") as e:
        paired_difference(a, {"t/0": (2, 1), "t/9": (2, 0)}, names=("ppo", "sft"))
    assert "'t/1' only in ppo" in str(e.value) and "\n" not in str(e.value)


def test_pick_vs_random():
    rows = [{"task_id": "a", "passed": p, "rm_score": s} for p, s in ((True, 2.0), (False, 1.0), (False, 0.0))] + \
           [{"task_id": "b", "passed": p, "rm_score": s} for p, s in ((False, 2.0), (True, 1.0))]
    d = pick_vs_random(rows, "rm_score", n_boot=1000)
    assert d["pass@1"] == pytest.approx(((1 - 1 / 3) + (0 - 1 / 2)) / 2)
    assert d["ci"][0] <= d["pass@1"] <= d["ci"][1]


# ----------------------------------------------------------------------------- best of n

def brute_force_best_of(scores, values, m):
    """Mean over every m-subset of the mean value of its top-scoring members (a uniform pick among ties)."""
    total, subsets = 0.0, list(itertools.combinations(range(len(scores)), m))
    for sub in subsets:
        top = max(scores[i] for i in sub)
        tied = [values[i] for i in sub if scores[i] == top]
        total += sum(tied) / len(tied)
    return total / len(subsets)


@pytest.mark.parametrize("seed", range(8))
def test_expected_best_of_equals_enumeration_with_ties(seed):
    r = random.Random(seed)
    n = r.randint(1, 8)
    scores = [r.choice([0.0, 0.5, 1.0, 1.5]) for _ in range(n)]   # few distinct values: many ties
    values = [r.choice([0.0, 1.0, r.random()]) for _ in range(n)]
    for m in range(1, n + 1):
        assert expected_best_of(scores, values, m) == pytest.approx(brute_force_best_of(scores, values, m), abs=1e-12)


def test_expected_best_of_hand_case_and_oracle_is_pass_at_k():
    # scores 3, 1, 1, 0 with values 0, 1, 0, 1; m = 2: the 3 pairs with sample 0 give 0; (1, 2) gives
    # 1/2 (tie), (1, 3) gives 1, (2, 3) gives 0: (0.5 + 1) / 6 = 0.25
    assert expected_best_of([3, 1, 1, 0], [0, 1, 0, 1], 2) == pytest.approx(0.25)
    assert expected_best_of([3, 1, 1, 0], [0, 1, 0, 1], 1) == pytest.approx(0.5)   # the mean
    assert expected_best_of([3, 1, 1, 0], [0, 1, 0, 1], 4) == pytest.approx(0.0)   # always the top one
    for n, c in [(10, 0), (10, 3), (10, 10), (7, 1)]:
        passed = [True] * c + [False] * (n - c)
        for m in range(1, n + 1):
            assert expected_best_of(passed, passed, m) == pytest.approx(pass_at_k(n, c, m), abs=1e-12)
    with pytest.raises(ValueError):
        expected_best_of([1, 2], [0, 1], 3)


def test_kl_best_of_n():
    assert kl_best_of_n(1) == 0.0
    assert kl_best_of_n(2) == pytest.approx(math.log(2) - 0.5)
    assert kl_best_of_n(16) == pytest.approx(math.log(16) - 15 / 16)


def test_best_of_n_table_starts_at_pass_at_1():
    rng = random.Random(0)
    rows = [{"task_id": f"t/{t}", "passed": rng.random() < 0.4, "rm_score": round(rng.gauss(0, 1), 1),
             "mean_logprob": -rng.random()} for t in range(12) for _ in range(10)]
    table = best_of_n_table(rows)
    assert [r["n"] for r in table] == [1, 2, 4, 8, 10]
    p1 = np.mean([c / n for n, c in per_problem_counts(rows).values()])
    first = table[0]
    assert first["kl"] == 0.0 and first["gold_rm"] == first["gold_logp"] == first["gold_oracle"] == round(p1, 4)
    assert first["rm_score"] == round(np.mean([r["rm_score"] for r in rows]), 4)
    assert all(a["rm_score"] <= b["rm_score"] and a["gold_oracle"] <= b["gold_oracle"] for a, b in zip(table, table[1:]))
    assert table[-1]["gold_oracle"] == round(evaluate.pass_at_k_table(rows, (10,))["pass@10"], 4)


# ----------------------------------------------------------------------------- end to end

# two problems a random model sometimes solves (the body is in the prompt, which ends inside a comment:
# a completion passes when it stays on that line), then four it does not
PROBLEMS = [{"prompt": f"def {name}(a, b):\n    return {body}\n# ", "entry_point": name, "canonical_solution": "",
             "test": f"def check(candidate):\n    assert candidate(2, 3) == {value}\n"}
            for name, body, value in [("plus", "a + b", 5), ("minus", "a - b", -1)]]
PROBLEMS += [{"prompt": f"def {name}(a, b):\n    \"\"\"{doc}\"\"\"\n", "entry_point": name,
              "canonical_solution": f"    return {body}\n",
              "test": f"def check(candidate):\n    assert candidate(2, 3) == {value}\n"}
             for name, doc, body, value in [
                 ("add", "Return a plus b.", "a + b", 5), ("sub", "Return a minus b.", "a - b", -1),
                 ("mul", "Return a times b.", "a * b", 6), ("big", "Return the larger of a and b.", "max(a, b)", 3)]]
PROBLEMS = [{"task_id": f"t/{i}", **p} for i, p in enumerate(PROBLEMS)]


@pytest.fixture(scope="module")
def toy_out(tmp_path_factory):
    """out/ with a random sft.pt and rm.pt (a tokenizer trained on the problems) and a test file."""
    out = tmp_path_factory.mktemp("out")
    text = "".join(p["prompt"] + p["canonical_solution"] for p in PROBLEMS) * 8
    enc = tok.train([text], 300)
    (out / "tasks").mkdir()
    (out / "tasks" / "test.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    torch.manual_seed(0)
    lm = GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=32))
    save_checkpoint(out / "sft.pt", lm, tokenizer=tok.to_state(enc), stage="sft", step=0)
    rm, _ = load_checkpoint(out / "sft.pt", head="scalar")
    save_checkpoint(out / "rm.pt", rm, tokenizer=tok.to_state(enc), stage="reward", step=0)
    return out


def test_end_to_end_writes_the_evidence_keys(toy_out, capsys):
    out = toy_out
    common = ["--out_dir", str(out), "--problems", str(out / "tasks" / "test.jsonl"), "--device=cpu",
              "--max_new_tokens=8", "--val_iters=0", "--k=1,2", "--workers=2"]
    evaluate.main(["--ckpt", str(out / "sft.pt"), "--model_name", "base", "--n=2", *common])
    summary = evaluate.main(["--ckpt", str(out / "sft.pt"), "--rm", str(out / "rm.pt"), "--model_name", "sft",
                             "--n=4", "--temperature=0.8", "--sweep=0.2,0.8,1.0", "--sweep_n=2", "--sweep_problems=3",
                             *common])
    results = json.loads((out / "results.json").read_text())
    sft = results["models"]["sft"]
    assert sft == {**summary, "ci": sft["ci"]} and set(sft["ci"]) == {"pass@1", "pass@2"}
    assert (sft["n"], sft["temperature"], sft["n_problems"]) == (4, 0.8, 6)
    for key in ("pass@1", "pass@2"):
        lo, hi = sft["ci"][key]
        assert lo <= sft[key] <= hi
    sweep = results["temperature_sweep"]
    assert sweep["model"] == "sft" and sweep["n"] == 2 and sweep["n_problems"] == 3
    assert [r["temperature"] for r in sweep["rows"]] == [0.2, 0.8, 1.0]
    assert all({"pass@1", "pass@2", "ci"} <= set(r) for r in sweep["rows"])
    assert set(sweep["best"]) == {"pass@1", "pass@2"}
    assert sweep["best"]["pass@1"] == max(sweep["rows"], key=lambda r: r["pass@1"])["temperature"]
    sweep_samples = evaluate.read_jsonl(out / "eval" / "sft_T0.8_samples.jsonl")  # 0.8 sampled again for the sweep
    assert len(sweep_samples) == 3 * 2 and {s["task_id"] for s in sweep_samples} == {"t/0", "t/1", "t/2"}
    bon = results["best_of_n"]
    assert bon["model"] == "sft" and bon["temperature"] == 0.8
    assert [r["n"] for r in bon["rows"]] == [1, 2, 4]
    assert all(set(r) == {"n", "kl", "gold_rm", "rm_score", "gold_logp", "gold_oracle"} for r in bon["rows"])
    first = bon["rows"][0]
    assert first["gold_rm"] == first["gold_logp"] == first["gold_oracle"] == sft["pass@1"]
    comparisons = results["comparisons"]
    assert set(comparisons["sft-base"]) == {"pass@1", "ci", "pass@2", "ci@2"}
    assert {"sft:rm_score-random", "sft:mean_logprob-random", "sft:oracle-random"} <= set(comparisons)
    # --compare recomputes the same numbers; --table shows the intervals
    before = {k: results[k] for k in ("comparisons", "best_of_n")}
    evaluate.main(["--out_dir", str(out), "--compare", "--k=1,2"])
    after = json.loads((out / "results.json").read_text())
    assert {k: after[k] for k in before} == before
    capsys.readouterr()
    report.main(["--table", str(out / "results.json")])
    table = capsys.readouterr().out
    lo, hi = sft["ci"]["pass@1"]
    assert f"{sft['pass@1']:.3f} [{lo:.3f}, {hi:.3f}]" in table
    assert "| sft - base |" in table and "Best-of-n" in table and "Temperature sweep" in table


def test_rm_scores_added_after_sampling_equal_scores_taken_while_sampling(toy_out, tmp_path, capsys):
    """run.sh samples SFT beside the reward stage, then `--rm R --model_name sft` adds the RM's
    scores: the same files, picks, best-of-n and comparisons as `--ckpt ... --rm R` in one go."""
    import shutil
    dirs = {}
    for name in ("together", "after"):
        d = dirs[name] = tmp_path / name
        d.mkdir()
        for f in ("sft.pt", "rm.pt"):
            shutil.copy(toy_out / f, d / f)
        shutil.copytree(toy_out / "tasks", d / "tasks")

    def common(d):
        return ["--out_dir", str(d), "--problems", str(d / "tasks" / "test.jsonl"), "--device=cpu", "--n=4",
                "--max_new_tokens=8", "--val_iters=0", "--k=1,2", "--workers=2", "--model_name", "sft"]
    evaluate.main(["--ckpt", str(dirs["together"] / "sft.pt"), "--rm", str(dirs["together"] / "rm.pt"),
                   *common(dirs["together"])])
    evaluate.main(["--ckpt", str(dirs["after"] / "sft.pt"), *common(dirs["after"])])
    before = json.loads((dirs["after"] / "results.json").read_text())
    assert "rm_score" not in before["models"]["sft"]["pick"] and "best_of_n" not in before
    evaluate.main(["--rm", str(dirs["after"] / "rm.pt"), *common(dirs["after"])])
    a, b = (json.loads((dirs[n] / "results.json").read_text()) for n in ("together", "after"))
    assert a["models"]["sft"] == b["models"]["sft"] and "rm_score" in b["models"]["sft"]["pick"]
    assert a["best_of_n"] == b["best_of_n"] and a["comparisons"] == b["comparisons"]
    for f in ("sft_samples.jsonl", "sft_samples.jsonl_results.jsonl"):
        rows_a, rows_b = (evaluate.read_jsonl(dirs[n] / "eval" / f) for n in ("together", "after"))
        assert [r["rm_score"] for r in rows_a] == pytest.approx([r["rm_score"] for r in rows_b], abs=1e-6)
        assert [{k: v for k, v in r.items() if k != "rm_score"} for r in rows_a] == \
            [{k: v for k, v in r.items() if k != "rm_score"} for r in rows_b]
    # a model with no recorded samples: a one-line error
    capsys.readouterr()
    with pytest.raises(SystemExit):
        evaluate.main(["--rm", str(dirs["after"] / "rm.pt"), *common(dirs["after"])[:-1], "ppo"])
    err = capsys.readouterr().err.strip()
    assert "ppo_samples.jsonl" in err and len(err.splitlines()) == 1


def test_compare_refuses_models_on_different_problems(toy_out, tmp_path, capsys):
    out = tmp_path
    rows = [{"task_id": "t/0", "completion": "", "passed": True}, {"task_id": "t/1", "completion": "", "passed": False}]
    (out / "eval").mkdir()
    evaluate.write_jsonl(evaluate.results_path(out, "sft"), rows)
    evaluate.write_jsonl(evaluate.results_path(out, "ppo"), rows[:1] + [{**rows[1], "task_id": "t/2"}])
    (out / "results.json").write_text(json.dumps({"models": {"sft": {"pass@1": 0.5}, "ppo": {"pass@1": 0.5}}}))
    with pytest.raises(SystemExit):
        evaluate.main(["--out_dir", str(out), "--compare"])
    err = capsys.readouterr().err.strip()
    assert "cannot pair ppo with sft" in err and len(err.splitlines()) == 1
    # a results file that is not the recorded evaluation (a previous run's) is refused, or skipped
    (out / "results.json").write_text(json.dumps({"models": {"sft": {"pass@1": 0.5}, "ppo": {"pass@1": 0.25}}}))
    with pytest.raises(SystemExit):
        evaluate.main(["--out_dir", str(out), "--compare"])
    err = capsys.readouterr().err.strip()
    assert "stale" in err and "ppo" in err and len(err.splitlines()) == 1
    update = evaluate.evidence(out, strict=False)
    assert set(update["models"]) == {"sft"} and update["comparisons"] == {}   # one sample per task: no picks
    (out / "results.json").write_text(json.dumps({"models": {"sft": {"pass@1": 0.5}, "ppo": {"kl": 0.1}}}))
    assert set(evaluate.evidence(out)["models"]) == {"sft"}   # ppo.py's entry, not evaluated yet


def test_figures_are_small_pngs_or_skipped(tmp_path, monkeypatch, capsys):
    results = {
        "models": {"sft": {"pass@1": 0.3, "pass@10": 0.6, "ci": {"pass@1": [0.25, 0.35], "pass@10": [0.5, 0.7]}},
                   "ppo": {"pass@1": 0.32, "kl": 0.2, "kl_ref": 0.3, "ci": {"pass@1": [0.27, 0.37]}, "reward": "rm",
                           "climb": {"of": "rm_score", "first": 0.0, "last": 0.2, "diff": 0.2, "se": 0.1}}},
        "temperature_sweep": {"model": "sft", "n": 10, "best": {"pass@1": 0.2},
                              "rows": [{"temperature": t, "pass@1": 0.4 - t / 4, "pass@10": 0.5 + t / 5,
                                        "ci": {"pass@1": [0.3 - t / 4, 0.5 - t / 4]}, "kl_ref": abs(0.8 - t)}
                                       for t in (0.2, 0.6, 0.8, 1.0)]},
        "best_of_n": {"model": "sft", "temperature": 0.8, "rows": [
            {"n": n, "kl": kl_best_of_n(n), "gold_rm": 0.3 + n / 100, "rm_score": n / 10, "gold_logp": 0.3,
             "gold_oracle": 0.3 + n / 30} for n in (1, 2, 4, 8)]}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "ppo.jsonl").write_text("".join(
        json.dumps({"iter": i, "kl": i / 10, "rm_score": i / 5, "gold_pass": 0.3, "gold_frac": 0.4}) + "\n"
        for i in range(5)))
    (tmp_path / "kl_sweep.json").write_text(json.dumps({"rows": [
        {"kl_coef": c, "kl": 1 / c / 100, "rm_score": 0.1, "gold_pass": 0.3, "pass@1": 0.31, "ci": [0.28, 0.34]}
        for c in (0.01, 0.05)]}))
    monkeypatch.setattr(report.common, "pyplot", lambda: None)
    assert report.figures(tmp_path) == []
    assert "matplotlib is not installed" in capsys.readouterr().out
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    written = report.figures(tmp_path)
    assert sorted(p.name for p in written) == ["frontier.png", "pass_at_k.png", "ppo_training.png", "temperature.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" and p.stat().st_size < 200_000 for p in written)


def test_pick_versus_another_rule():
    rows = [{"task_id": "a", "passed": p, "rm_score": s, "mean_logprob": l}
            for p, s, l in ((True, 2.0, -1.0), (False, 1.0, -0.5))] + \
           [{"task_id": "b", "passed": p, "rm_score": s, "mean_logprob": l}
            for p, s, l in ((False, 2.0, -1.0), (True, 1.0, -2.0))]
    d = pick_vs_random(rows, "rm_score", n_boot=1000, versus="mean_logprob")
    assert d["pass@1"] == pytest.approx((1 - 0) / 2 + (0 - 0) / 2)
    assert pick_vs_random(rows, "rm_score", versus="rm_score") == {"pass@1": 0.0, "ci": [0.0, 0.0]}


def test_tables_list_models_in_the_chains_order():
    """run.sh's lanes record ppo_ptx before ppo when it finishes first: tables and figures still read
    base, sft, ppo, ppo_ptx, then any other model in the order recorded."""
    recorded = {"ppo_ptx": 1, "custom": 2, "sft": 3, "ppo_r2": 4, "base": 5, "ppo": 6}
    assert list(evaluate.chain_order(recorded)) == ["base", "sft", "ppo", "ppo_ptx", "custom", "ppo_r2"]


def test_versus_tempered_interpolates_the_cooler_reference_at_the_same_kl():
    """A policy against the reference sampled cooler at the same KL: per problem, the reference's
    pass@1 interpolated linearly in KL between the temperatures around the policy's KL, paired."""
    ids = [f"t/{i}" for i in range(4)]
    warm = {t: (4, c) for t, c in zip(ids, (0, 1, 2, 1))}   # kl 0: pass@1 0, .25, .5, .25
    cool = {t: (4, c) for t, c in zip(ids, (2, 3, 4, 1))}   # kl 1: .5, .75, 1, .25
    policy = {t: (4, c) for t, c in zip(ids, (1, 2, 4, 0))}  # .25, .5, 1, 0
    d = versus_tempered(policy, 0.5, [(0.0, warm), (1.0, cool)], n_boot=1000)
    # the reference at kl 0.5: .25, .5, .75, .25; policy minus it: 0, 0, .25, -.25
    assert d["pass@1"] == pytest.approx(0.0) and not d["beyond"] and d["kl"] == 0.5
    assert d["ci"][0] <= 0 <= d["ci"][1]
    far = versus_tempered(policy, 3.0, [(0.0, warm), (1.0, cool)], n_boot=1000)  # past the coolest: against it
    assert far["beyond"] and far["pass@1"] == pytest.approx((0.25 + 0.5 + 1 + 0) / 4 - (0.5 + 0.75 + 1 + 0.25) / 4)


def test_kl_to_the_reference_is_zero_for_the_reference_itself_and_positive_for_another(toy_out, tmp_path):
    """evaluate.py --ref: each sample's log-prob under the reference (the same tokens, the
    reference's temperature) and the model's KL to it: 0 for the reference itself, sampled at its
    own temperature; > 0 for the reference sampled cooler (the sampled estimate of KL(pi_T || pi_ref))."""
    import shutil
    for f in ("sft.pt", "tasks"):
        (shutil.copytree if f == "tasks" else shutil.copy)(toy_out / f, tmp_path / f)
    args = ["--out_dir", str(tmp_path), "--problems", str(tmp_path / "tasks" / "test.jsonl"), "--device=cpu",
            "--n=4", "--max_new_tokens=8", "--val_iters=0", "--k=1", "--workers=1", "--ref", str(tmp_path / "sft.pt")]
    evaluate.main(["--ckpt", str(tmp_path / "sft.pt"), "--model_name", "sft", "--sweep=0.3,0.8", *args])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["models"]["sft"]["kl_ref"] == pytest.approx(0.0, abs=1e-4)
    rows = {r["temperature"]: r for r in results["temperature_sweep"]["rows"]}
    assert rows[0.3]["kl_ref"] > 0.01 and rows[0.8]["kl_ref"] == pytest.approx(0.0, abs=1e-4)
    samples = evaluate.read_jsonl(tmp_path / "eval" / "sft_samples.jsonl")
    assert all(s["sum_logprob"] == pytest.approx(s["ref_logprob"], abs=1e-4) and "tokens" not in s for s in samples)
