"""How much of PPO's first policy gradient is signal, for each reward and baseline at equal rollouts.

Draws M independent rollout batches of `--batch` completions from sft.pt (ppo.rollout: the same
sampler, rewards, normalisation, baseline and value model as iteration 0 of `ppo.py`), and for each
batch the gradient of PPO's policy loss at ratio 1 (the clipped surrogate's gradient before any step:
-mean_t A_t * grad log pi(y_t)). Gradients of independent batches share the true gradient mu and
differ by noise, so for two of them

    E[cos(g_i, g_j)] ~= |mu|^2 / (|mu|^2 + sigma^2 / N)       (N rollouts per batch)

the fraction of a batch gradient's squared norm that is signal. Signal equals noise at a batch of
N * (1 - c) / c rollouts. Each variant is a reward (rm: the reward model, exec: the fraction of
tests passed) and k, the samples per prompt (k > 1: the leave-one-out baseline), at the same N.

    python bench/ppo_gradient_snr.py --out_dir out/tiny [--batches 8] [--batch 128] [--variants rm:1,exec:1,exec:4]
"""
import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ppo  # noqa: E402
import tokenizer as tok  # noqa: E402
from execution import Sandbox  # noqa: E402
from reward import label  # noqa: E402
from tokenizer import special_ids  # noqa: E402


def policy_gradient(policy, batch, advantages, cfg, pad_id):
    """The flattened gradient of the PPO policy loss at ratio 1 over the whole rollout batch."""
    policy.zero_grad(set_to_none=True)
    B = batch["seq"].shape[0]
    n_tokens = batch["mask"].sum()
    for rows in torch.arange(B).split(cfg.minibatch_size):
        seq, valid, P, R = ppo.cut_padding(batch["seq"][rows], batch["valid"][rows], batch["P"])
        logp = ppo.response_logprobs(policy, seq, valid, P, cfg.temperature, pad_id)
        loss = -(advantages[rows, :R] * logp * batch["mask"][rows, :R]).sum() / n_tokens
        loss.backward()
    return torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None]).clone()


def mean_cosine(gs):
    """The mean cosine over all pairs of the M gradients, and its 95% interval by the jackknife over
    batches (leave one batch out; the pairs share batches, so they are not independent samples)."""
    M = len(gs)
    cos = {(i, j): float(torch.nn.functional.cosine_similarity(gs[i], gs[j], dim=0))
           for i, j in itertools.combinations(range(M), 2)}
    c = statistics.mean(cos.values())
    loo = [statistics.mean(v for (i, j), v in cos.items() if k not in (i, j)) for k in range(M)]
    se = ((M - 1) / M * sum((x - statistics.mean(loo)) ** 2 for x in loo)) ** 0.5
    return c, (c - 1.96 * se, c + 1.96 * se)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out_dir", default="out/tiny")
    ap.add_argument("--batches", type=int, default=8, help="independent rollout batches (M) per variant")
    ap.add_argument("--batch", type=int, default=128, help="rollouts per batch (N): ppo.py's batch_size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="rm:1,rm:4,exec:1,exec:4",
                    help="reward:k pairs (reward rm or exec; k samples per prompt)")
    args = ap.parse_args()
    out = Path(args.out_dir)
    torch.manual_seed(args.seed)
    cfg = ppo.Config(batch_size=args.batch)
    policy, ref, value_model, reward_model, ckpt = ppo.load_models(*ppo.model_paths(cfg, out), "cpu")
    enc = tok.from_state(ckpt["tokenizer"])
    _, pad_id = special_ids(enc)
    problems, task_ids = ppo.load_prompts(out, enc, policy.config.block_size - cfg.max_new_tokens)
    variants = [(r, int(k)) for r, k in (v.split(":") for v in args.variants.split(","))]
    norm = None
    if any(r == "rm" for r, _ in variants):
        norm = ppo.score_stats(ref, reward_model, enc, problems, task_ids, cfg)
        print(f"reward normalisation: mean {norm[0]:.4f}, std {norm[1]:.4f}")
    rng, sample_rng = torch.Generator().manual_seed(args.seed), torch.Generator().manual_seed(args.seed)
    with Sandbox(workers=cfg.workers) as sandbox:
        for reward, k in variants:
            grads = []
            for m in range(args.batches):
                picks = torch.randperm(len(task_ids), generator=rng)[:args.batch // k].tolist()
                ids = [task_ids[i] for i in picks for _ in range(k)]
                batch = ppo.rollout(policy, ref, value_model, reward_model if reward == "rm" else None, enc,
                                    problems, ids, cfg, sample_rng)
                frac = torch.tensor(label(problems, batch["samples"], sandbox=sandbox)[0])
                score = frac if reward == "exec" else ppo.normalize_score(batch["score"], *norm)
                terminal = ppo.leave_one_out(ppo.terminal_reward(score, batch["no_stop"], cfg.no_stop_penalty), k)
                rewards, _ = ppo.shaped_rewards(batch["logp"], batch["ref_logp"], terminal, batch["mask"], cfg.kl_coef)
                adv, _ = ppo.gae(rewards, batch["values"], batch["mask"], cfg.gamma, cfg.lam)
                grads.append(policy_gradient(policy, batch, ppo.whiten(adv, batch["mask"]), cfg, pad_id))
                print(f"{reward}:{k} batch {m + 1}/{args.batches}: tests passed {float(frac.mean()):.3f}")
            c, (lo, hi) = mean_cosine(grads)
            need = args.batch * (1 - c) / c if c > 0 else float("inf")
            print(f"reward {reward:4s} k {k}: mean cos between batch gradients {c:.4f} [{lo:.4f}, {hi:.4f}] "
                  f"(signal fraction at N = {args.batch}); signal = noise at N ~= {need:,.0f} rollouts")


if __name__ == "__main__":
    main()
