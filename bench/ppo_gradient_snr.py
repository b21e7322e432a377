"""How much of PPO's first policy gradient is signal: the measurement behind the README's PPO diagnosis.

Draws M independent rollout batches of `--batch` completions from sft.pt (ppo.rollout: the same
sampler, rewards, normalisation and value model as iteration 0 of `ppo.py`), and for each batch the
gradient of PPO's policy loss at ratio 1 (the clipped surrogate's gradient before any step:
-mean_t A_t * grad log pi(y_t)). Gradients of independent batches share the true gradient mu and
differ by noise, so for two of them

    E[cos(g_i, g_j)] ~= |mu|^2 / (|mu|^2 + sigma^2 / N)       (N rollouts per batch)

the fraction of a batch gradient's squared norm that is signal. Signal equals noise at a batch of
N * (1 - c) / c rollouts. Printed for the terminal reward (the RM score at the last token) and for
`--token_reward` (the mean-pooled RM's score split over its tokens), on the same samples.

    python bench/ppo_gradient_snr.py --out_dir out/tiny [--batches 8] [--batch 128]
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
from tokenizer import special_ids  # noqa: E402


def policy_gradient(policy, batch, advantages, cfg, pad_id):
    """The flattened gradient of the PPO policy loss at ratio 1 over the whole rollout batch."""
    policy.zero_grad(set_to_none=True)
    B = batch["seq"].shape[0]
    n_tokens = batch["mask"].sum()
    for rows in torch.arange(B).split(cfg.minibatch_size):
        seq, valid, P, R = ppo.cut_padding(batch["seq"][rows], batch["valid"][rows], batch["P"])
        logp, _ = ppo.response_logprobs(policy, seq, valid, P, cfg.temperature, pad_id)
        loss = -(advantages[rows, :R] * logp * batch["mask"][rows, :R]).sum() / n_tokens
        loss.backward()
    return torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None]).clone()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out_dir", default="out/tiny")
    ap.add_argument("--batches", type=int, default=8, help="independent rollout batches (M)")
    ap.add_argument("--batch", type=int, default=128, help="rollouts per batch (N): ppo.py's batch_size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="terminal:0.95,token:0.95",
                    help="credit:lambda pairs (credit terminal or token; GAE lambda) measured on the same samples")
    args = ap.parse_args()
    out = Path(args.out_dir)
    torch.manual_seed(args.seed)
    cfg = ppo.Config(batch_size=args.batch, token_reward=True)
    policy, ref, value_model, reward_model, ckpt = ppo.load_models(*ppo.model_paths(cfg, out), "cpu")
    enc = tok.from_state(ckpt["tokenizer"])
    _, pad_id = special_ids(enc)
    problems, task_ids = ppo.load_prompts(out, enc, policy.config.block_size - cfg.max_new_tokens)
    norm = ppo.score_stats(ref, reward_model, enc, problems, task_ids, cfg)
    print(f"reward normalisation: mean {norm[0]:.4f}, std {norm[1]:.4f}")
    rng, sample_rng = torch.Generator().manual_seed(args.seed), torch.Generator().manual_seed(args.seed)
    variants = [(c, float(lam)) for c, lam in (v.split(":") for v in args.variants.split(","))]
    grads = {v: [] for v in variants}
    for m in range(args.batches):
        picks = torch.randperm(len(task_ids), generator=rng)[:args.batch].tolist()
        batch = ppo.rollout(policy, ref, value_model, reward_model, enc, problems, [task_ids[i] for i in picks],
                            cfg, sample_rng)
        score = ppo.normalize_score(batch["score"], *norm)
        for credit, lam in grads:
            split = batch["score_tokens"] / norm[1] if credit == "token" else None
            rewards, _ = ppo.shaped_rewards(batch["logp"], batch["ref_logp"], score, batch["no_stop"],
                                            batch["mask"], cfg.kl_coef, cfg.no_stop_penalty, split)
            adv, _ = ppo.gae(rewards, batch["values"], batch["mask"], cfg.gamma, lam)
            grads[credit, lam].append(policy_gradient(policy, batch, ppo.whiten(adv, batch["mask"]), cfg, pad_id))
        print(f"batch {m + 1}/{args.batches}: RM score {float(batch['score'].mean()):+.4f}")
    for (credit, lam), gs in grads.items():
        c, (lo, hi) = mean_cosine(gs)
        need = args.batch * (1 - c) / c if c > 0 else float("inf")
        print(f"{credit:8s} lambda {lam}: mean cos between batch gradients {c:.4f} [{lo:.4f}, {hi:.4f}] "
              f"(signal fraction at N = {args.batch}); signal = noise at N ~= {need:,.0f} rollouts")


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


if __name__ == "__main__":
    main()
