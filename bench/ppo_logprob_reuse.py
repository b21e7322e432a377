"""What reusing the sampler's log-probs saves a PPO iteration.

`ppo.rollout` takes pi_old from the sampler (generate returns the log-prob of every token it drew,
the same fp32 softmax(logits / T) as a forward pass over the finished sequence; tests/test_ppo.py
checks they are equal) instead of running the policy over the batch once more. This runs a few
iterations of ppo.py (`ppo.train`, its defaults: the exec recipe) and, inside each one, also runs
the pass that reuse avoids, timed on its own and compared with what it would have given:

    saving = recompute / (iteration + recompute)   (the iteration's seconds without the recompute)

Both are measured in the same iterations, under the same load, so the ratio does not depend on how
busy the machine is. Run from a finished chain (sft.pt, rm.pt, tasks/ppo.jsonl):

    python bench/ppo_logprob_reuse.py --out_dir out/tiny [--iterations 4]
"""
import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ppo  # noqa: E402

extra = []  # (seconds of the recompute pass, max |recomputed - reused| log-prob) per iteration


def rollout_and_recompute(policy, ref, value_model, reward_model, enc, problems, task_ids, cfg,
                          generator, ctx=ppo.nullcontext):
    """ppo.rollout, then the policy pass that ppo.rollout's reuse avoids (its `recompute` branch)."""
    out = rollout(policy, ref, value_model, reward_model, enc, problems, task_ids, cfg, generator, ctx)
    _, pad_id = ppo.special_ids(enc)
    t0, diff = time.perf_counter(), 0.0
    seq, valid, P = out["seq"], out["valid"], out["P"]
    n_prompt, n_response = valid[:, :P].sum(1), valid[:, P:].sum(1)
    by_length = (n_prompt * (n_response.max() + 1) + n_response).argsort()
    with torch.no_grad():
        for i in range(0, len(seq), cfg.minibatch_size):
            rows = by_length[i:i + cfg.minibatch_size]
            s, v, p, r = ppo.cut_padding(seq[rows], valid[rows], P)
            with ctx():
                logp = ppo.response_logprobs(policy, s, v, p, cfg.temperature, pad_id)
            m = out["mask"][rows, :r].bool()
            diff = max(diff, float((logp - out["logp"][rows, :r]).abs()[m].max()))
    extra.append((time.perf_counter() - t0, diff))
    return out


rollout = ppo.rollout


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out_dir", default="out/tiny")
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--reward", default="exec", choices=ppo.REWARDS)
    args = ap.parse_args()
    cfg = dataclasses.replace(ppo.Config(**ppo.PRESETS["tiny"]), reward=args.reward, ptx_coef=0.0,
                              iterations=args.iterations, eval_iters=0, run_name="bench_logprob_reuse")
    ppo.rollout = rollout_and_recompute
    history = ppo.train(cfg, Path(args.out_dir), record=False)
    (Path(args.out_dir) / f"{cfg.run_name}.pt").unlink(missing_ok=True)  # (a checkpoint of no use)
    rows = []
    for row, (t_extra, diff) in zip(history, extra):
        t_iter = sum(row["seconds"].values())
        rows.append((t_iter, t_extra, t_extra / (t_iter + t_extra), diff))
        print(f"iteration {row['iter']}: {t_iter:.1f} s, recompute {t_extra:.2f} s: saving "
              f"{rows[-1][2]:.1%} (max |recomputed - reused| log-prob {diff:.1e})")
    print(f"{cfg.batch_size} rollouts per iteration, {len(rows)} iterations: saving median "
          f"{statistics.median(r[2] for r in rows):.1%} (min {min(r[2] for r in rows):.1%}, "
          f"max {max(r[2] for r in rows):.1%}); iteration {statistics.median(r[0] for r in rows):.1f} s, "
          f"recompute {statistics.median(r[1] for r in rows):.2f} s")


if __name__ == "__main__":
    main()
