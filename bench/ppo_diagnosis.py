"""Why PPO did (not) climb its reward: the measurements behind the README's PPO diagnosis.

For the reference policy (sft.pt) sampled at temperatures T on the ppo prompts, prints the RM
score's mean and spread over samples, the noise of a rollout batch's mean (std / sqrt(batch)), and
the KL (nats per completion) from the policy PPO starts at (sft.pt at the rollout temperature 0.8)
that sampling at T costs: how much RM score a given KL can buy, against the RM's noise. Then the
quantiles of the RM score over the samples of each checkpoint in --policies (sft.pt first) at the
rollout temperature, and the lowest-scoring completion: where in its distribution a policy gains or
loses RM score (the mean of this RM is set by a left tail of malformed completions).

    python bench/ppo_diagnosis.py --out_dir out/tiny [--n 512] [--temperatures 0.8,0.6,0.4,0.2]
    python bench/ppo_diagnosis.py --out_dir out/tiny --temperatures= --policies out/tiny/ppo.pt
"""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ppo  # noqa: E402
import tokenizer as tok  # noqa: E402
from data.tasks import load_problems  # noqa: E402
from engine import sample_completions  # noqa: E402
from model import load_checkpoint  # noqa: E402
from reward import score_samples  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out_dir", default="out/tiny")
    ap.add_argument("--n", type=int, default=512, help="samples per temperature")
    ap.add_argument("--batch", type=int, default=128, help="PPO's rollout batch (for the noise of its mean)")
    ap.add_argument("--temperatures", default="0.8,0.6,0.4,0.2")
    ap.add_argument("--base_temperature", type=float, default=0.8, help="the rollout temperature")
    ap.add_argument("--policies", default="", help="comma-separated checkpoints whose RM-score quantiles "
                    "to print next to sft.pt's (e.g. a PPO run's .pt)")
    args = ap.parse_args()
    out = Path(args.out_dir)
    torch.manual_seed(0)
    sft, ckpt = load_checkpoint(out / "sft.pt")
    rm, _ = load_checkpoint(out / "rm.pt")
    sft.eval(), rm.eval()
    enc = tok.from_state(ckpt["tokenizer"])
    eot_id, pad_id = tok.special_ids(enc)
    problems = load_problems(out / "tasks" / "ppo.jsonl", "run data/tasks.py")
    ids = list(problems)
    g = torch.Generator().manual_seed(0)
    picks = [ids[i] for i in torch.randint(len(ids), (args.n,), generator=g).tolist()]
    prompts = [enc.encode_ordinary(problems[t]["prompt"]) for t in picks]
    print(f"{args.n} samples per temperature from {out / 'sft.pt'}; RM {out / 'rm.pt'}")
    print("T     RM mean  RM std  std/sqrt(batch)  KL to sft@T0   mean len  no-stop")

    def sample_and_score(policy, T):  # the same prompts and random stream for every policy and T
        comps = sample_completions(policy, enc, [problems[t]["prompt"] for t in picks], 64, temperature=T,
                                   batch_size=256, generator=torch.Generator().manual_seed(1))
        scores = torch.tensor(score_samples(rm, enc, problems, [{"task_id": t, "completion": c["completion"]}
                                                                for t, c in zip(picks, comps)]))
        return comps, scores

    for T in [float(t) for t in args.temperatures.split(",") if t]:
        comps, scores = sample_and_score(sft, T)
        # KL(pi_T || pi_T0) per completion = E_{y ~ pi_T} sum_t log pi_T(y_t) - log pi_T0(y_t), on the
        # sampled tokens (the completion's text re-encoded, as PPO's rollouts hold them up to the stop)
        kls = []
        for i in range(0, args.n, 64):
            resp = [enc.encode_ordinary(c["completion"]) + [eot_id] for c in comps[i:i + 64]]
            seq, valid, mask, P = ppo.pack(prompts[i:i + 64], resp, pad_id, "cpu")
            with torch.no_grad():
                lp_T, _ = ppo.response_logprobs(sft, seq, valid, P, T, pad_id)
                lp_0, _ = ppo.response_logprobs(sft, seq, valid, P, args.base_temperature, pad_id)
            kls.append(((lp_T - lp_0) * mask).sum(1))
        kl = torch.cat(kls)
        lens = torch.tensor([len(enc.encode_ordinary(c["completion"])) for c in comps], dtype=torch.float)
        no_stop = sum(c["finish"] == "length" for c in comps) / len(comps)
        print(f"{T:<5} {scores.mean():+.4f}  {scores.std():.4f}  {scores.std() / args.batch ** 0.5:.4f}"
              f"           {kl.mean():7.3f}       {lens.mean():6.1f}    {no_stop:.3f}")

    qs = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
    print(f"\nRM score quantiles at T={args.base_temperature}, {args.n} samples: "
          + "  ".join(f"q{q:g}" for q in qs))
    for path in [out / "sft.pt"] + [Path(p) for p in args.policies.split(",") if p]:
        policy, _ = load_checkpoint(path)
        comps, scores = sample_and_score(policy.eval(), args.base_temperature)
        q = torch.quantile(scores, torch.tensor(qs, dtype=scores.dtype)).tolist()
        worst = int(scores.argmin())
        print(f"{path.name}: mean {scores.mean():+.3f}  std {scores.std():.3f}  " + "  ".join(f"{x:+.2f}" for x in q)
              + f"  (min {scores[worst]:+.2f}: {comps[worst]['completion'][:60]!r})")


if __name__ == "__main__":
    main()
