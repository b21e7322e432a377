"""The chain's results for people: the README's markdown tables and the figures, from results.json.

    python report.py --table out/tiny/results.json       # the results as markdown tables
    python report.py --figures out/tiny                  # out/tiny/figures/*.png (needs matplotlib)

Nothing here computes a result: evaluate.py writes every number (pass@k, intervals, paired
differences, best-of-n, KL to SFT) into results.json, and this file only lays them out.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from evaluate import chain_order, is_real  # noqa: E402


def _fmt(v):
    return "" if v is None else f"{v:.3f}"


def _signed(v):
    return f"{v:+.3f}"


def _with_ci(value, ci, f=_fmt):
    return "" if value is None else f(value) + ("" if not ci else f" [{f(ci[0])}, {f(ci[1])}]")


def _verdicts(c, a, b):
    out = []
    for k in (1, 10):
        if f"pass@{k}" in c:
            real = is_real(c, k)
            out.append(f"pass@{k}: " + ((f"{a} > {b}" if c[f"pass@{k}"] > 0 else f"{a} < {b}") if real
                                        else "no difference shown"))
    return "; ".join(out)


def results_table(results):
    """The README's tables (markdown) from a run.sh results.json: each model's pass@k with its 95%
    interval and KL to SFT, the paired differences (a difference is called real only when its
    interval excludes 0), best-of-n and the temperature sweep when present."""
    models = chain_order(results.get("models", {}))
    lines = ["| model | pass@1 [95% CI] | pass@10 [95% CI] | KL to SFT on test | held-out code loss "
             "| pick by RM | pick by mean log-p | oracle |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        pick, ci = m.get("pick", {}), m.get("ci", {})
        lines.append(f"| {name} | {_with_ci(m.get('pass@1'), ci.get('pass@1'))} "
                     f"| {_with_ci(m.get('pass@10'), ci.get('pass@10'))} | {_fmt(m.get('kl_ref'))} "
                     f"| {_fmt(m.get('val_loss'))} | {_fmt(pick.get('rm_score'))} "
                     f"| {_fmt(pick.get('mean_logprob'))} | {_fmt(pick.get('oracle'))} |")
    shapes = sorted({(m["n_problems"], m["n"], m["temperature"], m.get("top_p", 1.0))
                     for m in models.values() if "n_problems" in m})
    if shapes:
        lines.append("\npass@k on " + "; ".join(f"{p} test problems x {n} samples at temperature {t}, top-p {tp}"
                                                for p, n, t, tp in shapes)
                     + "; [95% interval]: percentile bootstrap over problems (10,000 resamples); KL to SFT in "
                       "nats per completion, on the same samples.")
    runs = {name: m for name, m in models.items() if "climb" in m}
    if runs:
        lines += ["", "| PPO run | reward | its reward, first -> last iterations (s.e.) | rollouts' tests passed, "
                  "first -> last (s.e.) | KL on its prompts |", "|---|---|---|---|---|"]
        for name, m in runs.items():
            c, g = m["climb"], m.get("gold_climb")
            gold = "" if g is None else f"{g['first']:.3f} -> {g['last']:.3f}: {_signed(g['diff'])} ({g['se']:.3f})"
            lines.append(f"| {name} | {m.get('reward', 'rm')} | {c['of']} {c['first']:.3f} -> {c['last']:.3f}: "
                         f"{_signed(c['diff'])} ({c['se']:.3f}) | {gold} | {_fmt(m.get('kl'))} |")
    comparisons = results.get("comparisons", {})
    if comparisons:
        lines += ["", "| difference | pass@1 [95% CI] | pass@10 [95% CI] | real (interval excludes 0)? |",
                  "|---|---|---|---|"]
        for key, c in comparisons.items():
            a, b = key.split(":", 1)[-1].rsplit("-", 1)
            label = key.replace("-", " - ") if ":" not in key else f"{key.split(':')[0]}: pick by {a} - {b}"
            if "kl" in c:
                label += f" (at KL {c['kl']:.2f})"
            lines.append(f"| {label} | {_with_ci(c.get('pass@1'), c.get('ci'), _signed)} "
                         f"| {_with_ci(c.get('pass@10'), c.get('ci@10'), _signed)} | {_verdicts(c, a, b)} |")
    lines += best_of_n_lines(results.get("best_of_n")) + sweep_lines(results.get("temperature_sweep"))
    tok, rm, sec = results.get("tokenizer"), results.get("reward_model"), results.get("seconds")
    if tok:
        lines.append(f"\nTokenizer: vocab {tok['vocab_size']}, {tok['bytes_per_token']:.2f} bytes/token on held-out "
                     f"code ({tok['bytes_per_token_no_ws']:.2f} without the whitespace-run tokens).")
    if rm:
        lines.append(f"Reward model: held-out pairwise accuracy {rm['val_accuracy']:.3f} "
                     f"({rm['n_comparisons']} comparisons).")
    if sec:
        lines.append("Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in sec.items()) + ".")
    return "\n".join(lines)


def best_of_n_lines(bon):
    if not bon:
        return []
    at = "" if bon.get("temperature") is None else f" at temperature {bon['temperature']}"
    lines = ["", f"Best-of-n from {bon['model']}'s samples{at} (exact expectation over all n-subsets; "
             "KL_bon = log n - (n-1)/n):", "",
             "| n | KL_bon | gold, pick by RM | RM score of the pick | gold, pick by mean log-p | gold, oracle |",
             "|---|---|---|---|---|---|"]
    for r in bon["rows"]:
        lines.append(f"| {r['n']} | {_fmt(r['kl'])} | {_fmt(r['gold_rm'])} | {_fmt(r['rm_score'])} "
                     f"| {_fmt(r['gold_logp'])} | {_fmt(r['gold_oracle'])} |")
    return lines


def sweep_lines(sweep):
    if not sweep:
        return []
    keys = [k for k in sweep["rows"][0] if k.startswith("pass@")]
    kl = all("kl_ref" in r for r in sweep["rows"])
    lines = ["", f"Temperature sweep of {sweep['model']} ({sweep['n']} samples per problem; best: "
             + ", ".join(f"{k} at T={t}" for k, t in sweep["best"].items()) + "):", "",
             "| temperature | " + " | ".join(f"{k} [95% CI]" for k in keys) + (" | KL to SFT |" if kl else " |"),
             "|---|" + "---|" * (len(keys) + kl)]
    for r in sweep["rows"]:
        lines.append(f"| {r['temperature']} | " + " | ".join(_with_ci(r[k], r.get("ci", {}).get(k)) for k in keys)
                     + (f" | {_fmt(r['kl_ref'])} |" if kl else " |"))
    return lines


# ----------------------------------------------------------------------------- figures

def _read_log(out_dir, run):
    path = Path(out_dir) / "logs" / f"{run}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _smooth(xs, w=5):
    """Running mean over the last w values (one rollout batch is noisy)."""
    xs = np.asarray(xs, dtype=float)
    return np.array([xs[max(0, i - w + 1):i + 1].mean() for i in range(len(xs))])


def _errbar(ax, x, y, ci, **kw):  # one point with its interval (none drawn without one)
    lo, hi = ci or (y, y)
    ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], capsize=3, **kw)


def plot_pass_at_k(ax, models):
    for j, key in enumerate(("pass@1", "pass@10")):
        for i, m in enumerate(models.values()):
            if key in m:
                _errbar(ax, i + (j - 0.5) * 0.25, m[key], m.get("ci", {}).get(key), fmt="os"[j], color=f"C{j}",
                        label=key if i == 0 else None)
    ax.set_xticks(range(len(models)), list(models), fontsize=8)
    ax.set_ylabel("pass rate on test")
    ax.set_title("pass@k with 95% bootstrap intervals")
    ax.legend(fontsize=8)


def plot_sweep(ax, sweep):
    ts = [r["temperature"] for r in sweep["rows"]]
    for j, key in enumerate(k for k in sweep["rows"][0] if k.startswith("pass@")):
        ys = [r[key] for r in sweep["rows"]]
        cis = [r.get("ci", {}).get(key, [y, y]) for r, y in zip(sweep["rows"], ys)]
        ax.errorbar(ts, ys, yerr=[[y - c[0] for y, c in zip(ys, cis)], [c[1] - y for y, c in zip(ys, cis)]],
                    fmt="o-", capsize=3, color=f"C{j}", label=key)
    ax.set_xlabel("sampling temperature")
    ax.set_ylabel("pass@k")
    ax.set_title(f"{sweep['model']}: pass@k against temperature (n={sweep['n']})")
    ax.legend(fontsize=8)


def plot_frontier(ax, results):
    """Test pass@1 against KL to SFT (at the evaluation temperature), nats per completion: SFT
    sampled cooler (the sharpened SFT that a likelihood-like reward's KL-regularised optimum is),
    best-of-n by the RM and by an oracle (KL_bon), and each PPO run's final policy."""
    sweep = [r for r in (results.get("temperature_sweep") or {}).get("rows", []) if "kl_ref" in r]
    sft_t = (results.get("models", {}).get("sft") or {}).get("temperature")
    cool = sorted((r for r in sweep if sft_t is None or r["temperature"] <= sft_t), key=lambda r: r["kl_ref"])
    if cool:
        ax.plot([r["kl_ref"] for r in cool], [r["pass@1"] for r in cool], "o-", color="C0", label="SFT, cooler")
        for r in cool:
            ax.annotate(f"T={r['temperature']:g}", (r["kl_ref"], r["pass@1"]), fontsize=7,
                        xytext=(3, -9), textcoords="offset points")
    bon = (results.get("best_of_n") or {}).get("rows", [])
    if bon:
        kl = [r["kl"] for r in bon]
        ax.plot(kl, [r["gold_rm"] for r in bon], "^--", color="C1", ms=4, label="SFT best-of-n by RM")
        ax.plot(kl, [r["gold_oracle"] for r in bon], "v:", color="C7", ms=4, label="SFT best-of-n, oracle")
    for j, (name, m) in enumerate((n, m) for n, m in chain_order(results.get("models", {})).items()
                                  if "climb" in m and "kl_ref" in m and "pass@1" in m):
        _errbar(ax, m["kl_ref"], m["pass@1"], m.get("ci", {}).get("pass@1"), fmt="*", ms=11, color=f"C{3 + j}",
                label=f"{name} ({m.get('reward', 'rm')} reward)")
    ax.set_xlabel("KL(policy || SFT) on the test prompts, nats per completion")
    ax.set_ylabel("test pass@1 (gold)")
    ax.set_title("How much gold each way of optimising buys per nat of KL")
    ax.legend(fontsize=7)


def plot_training(axes, out_dir, runs):
    """Per PPO iteration: the rollouts' gold (fraction of tests passed, on prompts the run meets
    for the first time) and, for RM runs, the RM score; running means of 5 iterations."""
    gold, proxy = axes
    for j, run in enumerate(runs):
        log = _read_log(out_dir, run)
        if not log:
            continue
        it = [r["iter"] for r in log]
        if all(r.get("gold_frac") is not None for r in log):
            gold.plot(it, _smooth([r["gold_frac"] for r in log]), color=f"C{3 + j}", label=run)
        if all(r.get("rm_score") is not None for r in log):
            proxy.plot(it, _smooth([r["rm_score"] for r in log]), color=f"C{3 + j}", label=run)
    gold.set_ylabel("rollouts: fraction of tests passed")
    proxy.set_ylabel("rollouts: RM score")
    for ax in axes:
        ax.set_xlabel("PPO iteration")
        ax.legend(fontsize=7)
    gold.set_title("gold on the run's own (unseen) prompts")
    proxy.set_title("proxy: the reward model's score")


def figures(out_dir, dpi=100):
    """PNGs under out_dir/figures/ from results.json and logs/, each drawn only when its data is
    there: pass_at_k.png, temperature.png (Codex Figure 5), frontier.png (gold against KL, Gao et al.
    2022 Figure 1's axes), ppo_training.png. Without matplotlib nothing is drawn (returns [])."""
    plt = common.pyplot()
    if plt is None:
        print("figures: matplotlib is not installed, no figures drawn (pip install matplotlib)")
        return []
    out_dir = Path(out_dir)
    path = out_dir / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    models = {k: m for k, m in chain_order(results.get("models", {})).items() if "pass@1" in m}
    runs = [k for k, m in chain_order(results.get("models", {})).items() if "climb" in m]
    plots = [("pass_at_k.png", (5, 3.2), 1, lambda ax: plot_pass_at_k(ax, models), bool(models)),
             ("temperature.png", (5, 3.2), 1, lambda ax: plot_sweep(ax, results["temperature_sweep"]),
              bool((results.get("temperature_sweep") or {}).get("rows"))),
             ("frontier.png", (6, 4), 1, lambda ax: plot_frontier(ax, results),
              bool(results.get("temperature_sweep") or results.get("best_of_n"))),
             ("ppo_training.png", (9, 3.4), 2, lambda axes: plot_training(axes, out_dir, runs), bool(runs))]
    written = []
    for name, size, n_axes, draw, has_data in plots:
        if not has_data:
            continue
        fig, axes = plt.subplots(1, n_axes, figsize=size)
        draw(axes)
        for ax in np.atleast_1d(axes):
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(fig_dir / name, dpi=dpi)
        plt.close(fig)
        written.append(fig_dir / name)
    for f in written:
        print(f"figure: {f} ({f.stat().st_size // 1024} KB)")
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", metavar="RESULTS_JSON", help="print run.sh's results as markdown tables")
    p.add_argument("--figures", metavar="OUT_DIR", help="draw OUT_DIR/figures/*.png from OUT_DIR/results.json")
    args = p.parse_args(argv)
    if not (args.table or args.figures):
        p.error("give --table RESULTS_JSON or --figures OUT_DIR")
    if args.table:
        common.require(args.table, "run `bash run.sh` first")
        print(results_table(json.loads(Path(args.table).read_text())))
    if args.figures:
        common.require(Path(args.figures) / "results.json", "run `bash run.sh` first")
        figures(args.figures)


if __name__ == "__main__":
    main()
