"""The reward model's data curve: held-out pairwise accuracy, and the RM's pick against the
likelihood's pick on the test problems, as the number of comparisons grows (Gao et al. 2022: RMs
stay near chance below ~2k comparisons, and more data helps far more than more epochs).

Labels are free here, so the curve is measured, not extrapolated:
1. fresh rm prompts: data/tasks.py's generator with `--sizes`' largest multiple of the preset's
   n_rm, plus `--n_val` more (the test split and the instructions it uses stay excluded, as in the
   chain);
2. K completions of each from sft.pt at `--temperature`, labelled by execution (reward.py's own
   make_comparisons); the last n_val prompts' comparisons are the one held-out set of every size;
3. for each size s: an RM trained by reward.py on the first s * n_rm prompts' comparisons
   (one epoch, the preset's recipe), its accuracy on the held-out set before and after training, and
   on SFT's recorded test samples (out_dir/eval/sft_samples.jsonl_results.jsonl, from run.sh) the
   pass rate of its pick of each problem's samples minus that of the highest mean log-prob, paired
   over problems with a 95% bootstrap interval.

    python bench/rm_data_curve.py --out_dir out/tiny [--sizes 1,2,4,8] [--temperature 1.0]

Writes out_dir/rm_curve_T<temperature>/curve.json and prints a markdown table.
"""
import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import reward  # noqa: E402
import tokenizer as tok  # noqa: E402
from data import tasks  # noqa: E402
from data.tasks import read_jsonl, write_jsonl  # noqa: E402
from evaluate import pick_vs_random  # noqa: E402
from model import load_checkpoint  # noqa: E402


def comparisons(out, work, n_prompts, cfg):
    """work/comparisons.jsonl: K labelled samples of each of n_prompts fresh rm prompts (made once)."""
    path = work / "comparisons.jsonl"
    if path.exists():
        return reward.read_comparisons(path)
    problems = tasks.generate(dataclasses.replace(tasks.Config(), n_rm=n_prompts, n_ppo=0))["rm"]
    problems = {p["task_id"]: p for p in problems}
    write_jsonl(work / "rm_all.jsonl", list(problems.values()))
    sft, ckpt = load_checkpoint(common.require(out / "sft.pt", "run `bash run.sh` first"))
    t0 = time.time()
    rows = reward.make_comparisons(sft, tok.from_state(ckpt["tokenizer"]), problems, cfg,
                                   torch.Generator().manual_seed(cfg.seed))
    order = {t: i for i, t in enumerate(problems)}  # make_comparisons sorts by id: back to generation order
    rows.sort(key=lambda r: order[r["task_id"]])
    reward.write_comparisons(path, rows)
    print(f"{len(rows)} prompts x K = {cfg.k} labelled in {time.time() - t0:.0f}s -> {path}")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out_dir", default="out/tiny", help="a finished run.sh output (sft.pt, eval/, code/)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--sizes", default="1,2,4,8", help="multiples of the preset's n_rm prompts")
    ap.add_argument("--n_val", type=int, default=800, help="held-out prompts (the same for every size)")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the comparisons")
    args = ap.parse_args()
    out = Path(args.out_dir)
    sizes = [int(s) for s in args.sizes.split(",")]
    base = {**dataclasses.asdict(tasks.Config()), **tasks.PRESETS[args.preset]}["n_rm"]
    cfg = dataclasses.replace(reward.Config(**reward.PRESETS[args.preset]), temperature=args.temperature)
    work = out / f"rm_curve_T{args.temperature:g}"
    work.mkdir(parents=True, exist_ok=True)
    rows = comparisons(out, work, max(sizes) * base + args.n_val, cfg)
    reward.write_comparisons(work / "val.jsonl", rows[-args.n_val:])
    sft_rows = read_jsonl(common.require(out / "eval" / "sft_samples.jsonl_results.jsonl", "run `bash run.sh` first"))
    test = tasks.read_problems(out / "tasks" / "test.jsonl")
    problems = {p["task_id"]: p for p in read_jsonl(work / "rm_all.jsonl")}
    curve = []
    for s in sizes:
        d = work / f"x{s}"
        (d / "tasks").mkdir(parents=True, exist_ok=True)
        train_rows = rows[:s * base]
        reward.write_comparisons(d / "comparisons.jsonl", train_rows)
        write_jsonl(d / "tasks" / "rm.jsonl", [problems[r["task_id"]] for r in train_rows])
        run = dataclasses.replace(cfg, init=str(out / "sft.pt"), val_comparisons=str(work / "val.jsonl"))
        summary = reward.train(run, d, comparisons=[d / "comparisons.jsonl"])
        rm, ckpt = load_checkpoint(d / "rm.pt")
        scores = reward.score_samples(rm, tok.from_state(ckpt["tokenizer"]), test, sft_rows)
        scored = [dict(r, rm_score=x) for r, x in zip(sft_rows, scores)]
        pick = pick_vs_random(scored, "rm_score", versus="mean_logprob")
        curve.append({"size": s, "prompts": len(train_rows), "comparisons": summary["n_comparisons"],
                      "val_accuracy_before": summary["val_accuracy_before"], "val_accuracy": summary["val_accuracy"],
                      "rm_pick_minus_logp_pick": pick["pass@1"], "ci": pick["ci"]})
        (work / "curve.json").write_text(json.dumps({"temperature": args.temperature, "rows": curve}, indent=2) + "\n")
    print(f"\ncomparisons sampled at T = {args.temperature}; held-out: {args.n_val} prompts\n")
    print("| rm prompts | comparisons | held-out accuracy, before -> after | RM pick - mean log-p pick on test |")
    print("|---|---|---|---|")
    for r in curve:
        print(f"| {r['prompts']} | {r['comparisons']} | {r['val_accuracy_before']:.3f} -> {r['val_accuracy']:.3f} "
              f"| {r['rm_pick_minus_logp_pick']:+.3f} [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}] |")


if __name__ == "__main__":
    main()
