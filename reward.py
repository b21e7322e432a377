"""The reward model (InstructGPT §3.5 "RM", Eq. 1), with a program as the labeler.

1. Comparisons. For every prompt of the `rm` split, sample K completions from the SFT model at
   temperature 1. The labeler runs each one against the problem's unit tests in the sandbox and
   scores it by the fraction of asserts passed; K completions give C(K,2) pairs, and a pair with
   equal scores is no comparison (ties dropped, as in the paper). The comparisons are written to
   out/<preset>/comparisons.jsonl (task_id, prompt, completions, scores): inspect it, or replace the
   scores with your own labels and train with `--comparisons FILE`. With --references the prompt's
   reference solution is ranked among the samples too (Stiennon et al. 2020 did so with reference
   summaries): a model that passes no test still yields comparisons (run.sh --smoke uses it).
2. Training. The RM is the SFT model with a scalar head that gives one number per token of
   prompt + completion + <|endoftext|>; r(x, y) is their mean over the completion and the end of
   text (--pool=mean, the default here), or, as in InstructGPT, the output at the last token
   (--pool=last). With --loglik (the default) each token's number also counts the log-probability
   of that token under the SFT model's own tied unembedding, and the head starts at zero: the RM
   starts as the SFT model's mean log-likelihood of the completion (docs/RESULTS.md, "Reward model",
   compares it with a fresh head). --loglik=False --lr=3e-4 is InstructGPT's RM exactly (the
   unembedding replaced by the head). All C(K,2) comparisons of a prompt go in one batch element
   (one forward pass per completion, not per pair), with the loss
       loss = -1/C(K,2) * sum over pairs (y_w, y_l), s_w > s_l, of log sigmoid(r(x, y_w) - r(x, y_l)).
   One epoch (InstructGPT: more overfits). Then a bias so that the reference solutions of the rm
   prompts score 0 on average. Held-out prompts give the pairwise accuracy.
3. Scoring. `score_samples(rm, enc, problems, samples)`, and from the shell
       python reward.py --score samples.jsonl [--problems P]      # -> samples_rm.jsonl with rm_score

    python reward.py --preset tiny                       # sample, label, train -> out/tiny/rm.pt
    python reward.py --preset tiny --comparisons out/tiny/comparisons.jsonl   # train on existing labels
"""
import dataclasses
import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
from data.tasks import load_problems
from engine import distinct_rows, sample_completions
from model import POOLS, KVCache, cache_dtype, load_checkpoint, pad_left, save_checkpoint
from sft import split_holdout
from tokenizer import special_ids


@dataclass
class Config:
    k: int = 8                     # completions sampled per prompt (InstructGPT: 4..9)
    temperature: float = 1.0
    max_new_tokens: int = 128
    sample_batch: int = 256        # rows per sampling batch
    timeout: float = 3.0           # seconds per program in the sandbox
    references: bool = False       # also rank each prompt's reference solution among its samples
                                   # (Stiennon et al. 2020 ranked the reference summaries too): a
                                   # model that passes no test still gives comparisons (run.sh --smoke)
    epochs: int = 1                # InstructGPT: one epoch; more overfits
    batch_size: int = 4            # prompts (each with its K completions) per step
    lr: float = 1e-5               # with loglik: small steps keep the likelihood it starts from; --loglik=False: ~3e-4
    min_lr_ratio: float = 0.1
    warmup_iters: int = 5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    pool: str = "mean"             # r(x, y): "mean" of the head over the completion, or at the "last" token
    loglik: bool = True            # the head's outputs also count log p(token) under the tied unembedding
    holdout: float = 0.15          # fraction of the rm prompts held out for pairwise accuracy
    val_comparisons: str = ""      # measure accuracy on this comparisons file instead (all others train)
    # the flywheel (run.sh --rounds): round r samples from `policy`, trains on every round's comparisons
    round: int = 1                 # round r > 1 writes comparisons_r<r>.jsonl and rm_r<r>.pt
    policy: str = ""               # sample comparisons from this checkpoint (default out_dir/sft.pt)
    init: str = ""                 # the RM's trunk (and loglik term) starts from this LM (default out_dir/sft.pt)
    prev_rm: str = ""              # also report this RM's accuracy on this round's held-out comparisons
    log_interval: int = 1          # read loss and train accuracy (a host-device sync) every this many steps
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 1337


PRESETS = {
    "tiny": {},
    "small": dict(max_new_tokens=256, batch_size=16, warmup_iters=20, log_interval=10),
}


# ----------------------------------------------------------------------------- the loss (Eq. 1)

def rm_loss(rewards, scores):
    """InstructGPT Eq. 1 for one prompt: -1/C(K,2) * sum over pairs with s_w > s_l of
    log sigmoid(r_w - r_l).

    rewards (K,) are the RM's outputs r(x, y_k) for the K completions of one prompt, scores (K,)
    the labeler's. Every unordered pair is counted once, oriented by its scores; a tied pair adds
    nothing, but the normaliser stays C(K,2) (so a prompt with many ties weighs less), and a prompt
    whose scores are all equal gives 0 with a zero gradient."""
    K = rewards.shape[0]
    scores = torch.as_tensor(scores, dtype=torch.float32, device=rewards.device)
    diff = rewards[:, None] - rewards[None, :]           # diff[i, j] = r_i - r_j
    wins = scores[:, None] > scores[None, :]             # i preferred to j
    logsig = F.logsigmoid(diff.float())
    return -torch.where(wins, logsig, torch.zeros_like(logsig)).sum() / max(1, math.comb(K, 2))


def pairwise_accuracy(rewards, scores):
    """(correct, total) over the non-tied pairs of one prompt: the RM agrees when r_w > r_l."""
    r = torch.as_tensor(rewards, dtype=torch.float32)
    s = torch.as_tensor(scores, dtype=torch.float32)
    wins = s[:, None] > s[None, :]
    return int((wins & (r[:, None] > r[None, :])).sum()), int(wins.sum())


def n_pairs(scores):
    """The number of comparisons (non-tied pairs) among one prompt's K scores."""
    return sum(a > b for a in scores for b in scores)


# ----------------------------------------------------------------------------- sequences

def rm_sequence(enc, prompt, completion, block_size, eot_id):
    """THE reward-model input: (tokens, start) with tokens = encode(prompt) + encode(completion) +
    [eot] (docs/DESIGN.md) and start = where the completion begins; the completion is cut (the eot kept)
    if the whole would not fit the context."""
    p = enc.encode_ordinary(prompt)[-(block_size - 1):]
    c = enc.encode_ordinary(completion)[:block_size - 1 - len(p)]
    return p + c + [eot_id], len(p)


def pad_right(seqs, pad_id, device="cpu"):
    """Right-pad token lists into (B, T) ids; returns (idx, lengths). With a causal model, padding
    after a row's end never changes that row's outputs, so no attention mask is needed."""
    lengths = torch.tensor([len(s) for s in seqs], device=device)
    idx = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long, device=device)
    for b, s in enumerate(seqs):
        idx[b, :len(s)] = torch.tensor(s, dtype=torch.long)
    return idx, lengths


def score_sequences(model, seqs, pad_id, starts=None):
    """The reward model's score r(x, y) of each seqs[i] = prompt + completion + [end of text]
    (docs/DESIGN.md), from the scalar head's per-token outputs as model.config.pool says:
    - "last": the output at the last token (InstructGPT §3.5);
    - "mean": the mean of the outputs over the completion and the end of text, positions
      starts[i] .. len(seqs[i]) - 1 (starts[i] = the number of prompt tokens).
    Rows that share a prompt (reward.py's K completions of one prompt, n samples of a problem) run
    that prompt through the model once (`_score_shared_prompts`). Differentiable; wrap in no_grad
    to score."""
    mean = model.config.pool == "mean"
    if mean and starts is None:
        raise ValueError("pool='mean' needs starts: where each completion begins")
    device = next(model.parameters()).device
    out = None
    if mean and min(starts) >= 2:
        out = _score_shared_prompts(model, seqs, pad_id, starts, device)
    if out is None:
        idx, lengths = pad_right(seqs, pad_id, device)
        if not mean:
            values, _ = model(idx)
            return values.float()[torch.arange(len(seqs), device=idx.device), lengths - 1]
        starts = torch.as_tensor(starts, device=idx.device)
        pos = torch.arange(idx.shape[1], device=idx.device)[None]
        on = (pos >= starts[:, None]) & (pos < lengths[:, None])
        values, _ = model(idx, logits_at=on & (pos > 0))  # loglik: logits for the pooled tokens only
        out = values.float(), on
    values, on = out
    return (values * on).sum(1) / on.sum(1)


def _score_shared_prompts(model, seqs, pad_id, starts, device):
    """score_sequences' mean pool with each distinct prompt computed once: the prompt without its
    last token goes through the model into a KV cache (left-padded, one row per distinct prompt),
    the cache rows are copied out to the rows that share them, then each row's rest (the prompt's
    last token, the completion, the end of text; right-padded) attends to it. The same outputs as
    the whole sequences (up to floating-point order), gradients included: a prompt shared by K
    completions costs one prompt instead of K. None if no prompt repeats, or if the layout would not
    fit the context. Returns (outputs (B, T) fp32, pooled mask (B, T)) of the rows' rests."""
    distinct, row_of = distinct_rows([s[:st - 1] for s, st in zip(seqs, starts)])
    rests = [s[st - 1:] for s, st in zip(seqs, starts)]
    P, T = max(map(len, distinct)), max(map(len, rests))
    if len(distinct) == len(seqs) or P + T > model.config.block_size:
        return None
    row_of = torch.tensor(row_of, device=device)
    idx, valid = pad_left(distinct, pad_id, device)
    cache = KVCache(model.config, len(distinct), P + T, device, cache_dtype(model))
    model(idx, valid=None if bool(valid.all()) else valid, cache=cache, logits_at=torch.zeros_like(valid))
    cache.keep(row_of)
    idx, lengths = pad_right(rests, pad_id, device)
    pos = torch.arange(T, device=device)[None]
    real = pos < lengths[:, None]
    on = real & (pos > 0)  # pooled: everything after the prompt's last token
    values, _ = model(idx, valid=real, cache=cache, logits_at=on)
    return values.float(), on


def score(rm, seqs, pad_id):
    """r(x, y) of each (tokens, start) from rm_sequence: score_sequences."""
    return score_sequences(rm, [t for t, _ in seqs], pad_id, [s for _, s in seqs])


def batch_loss(rm, groups, pad_id):
    """Mean of Eq. 1 over a batch of prompts. groups: [(seqs, scores), ...], the K rm_sequence's of
    one prompt and their labeler scores. One forward pass for all completions of all prompts (never
    one per pair). Returns (loss, rewards per prompt)."""
    flat = [s for seqs, _ in groups for s in seqs]
    rewards = score(rm, flat, pad_id)
    per_prompt, losses, i = [], [], 0
    for seqs, scores in groups:
        r = rewards[i:i + len(seqs)]
        i += len(seqs)
        per_prompt.append(r)
        losses.append(rm_loss(r, scores))
    return torch.stack(losses).mean(), per_prompt


@torch.no_grad()
def score_samples(rm, enc, problems, samples, batch_size=64, progress=False):
    """The RM score of each sample ({task_id, completion}) under its problem's prompt, in order.
    Batched (sequences sorted by length) and without gradients."""
    eot_id, pad_id = special_ids(enc)
    block = rm.config.block_size
    seqs = []
    for s in samples:
        if s["task_id"] not in problems:
            raise KeyError(f"sample task_id {s['task_id']!r} is not in the problem file")
        seqs.append(rm_sequence(enc, problems[s["task_id"]]["prompt"], s["completion"], block, eot_id))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    out = [0.0] * len(seqs)
    was_training = rm.training
    rm.eval()
    for b in tqdm(range(0, len(order), batch_size), desc="rm score", disable=not progress, leave=False):
        rows = order[b:b + batch_size]
        for i, r in zip(rows, score(rm, [seqs[i] for i in rows], pad_id).tolist()):
            out[i] = r
    rm.train(was_training)
    return out


# ----------------------------------------------------------------------------- comparisons file

def write_comparisons(path, rows):
    """rows: dicts with task_id, prompt, completions (K strings), scores (K floats), and the tags
    round and policy (which flywheel round, which checkpoint sampled them) when present; JSONL."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            tags = {k: r[k] for k in ("round", "policy") if k in r}
            f.write(json.dumps({"task_id": r["task_id"], "prompt": r["prompt"],
                                "completions": list(r["completions"]),
                                "scores": [float(s) for s in r["scores"]], **tags}) + "\n")


def read_comparisons(path):
    """Read a comparisons file; a one-line error if a row is malformed."""
    path = common.require(path, "run `python reward.py` (without --comparisons) to sample one")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                ok = (isinstance(r.get("task_id"), str) and isinstance(r.get("prompt"), str)
                      and isinstance(r.get("completions"), list) and isinstance(r.get("scores"), list)
                      and len(r["completions"]) == len(r["scores"]) >= 2)
                r["scores"] = [float(s) for s in r["scores"]]
            except (ValueError, TypeError, AttributeError):
                ok = False
            if not ok:
                common.die(f"{path}:{n}: expected task_id, prompt, completions and scores (same length >= 2)")
            rows.append(r)
    if not rows:
        common.die(f"{path} holds no comparisons")
    return rows


def label(problems, samples, timeout=3.0, sandbox=None):
    """THE labeler: run each sample ({task_id, completion}) against its problem's unit tests in the
    sandbox and score it by the fraction of the test's asserts that pass (1.0 for a program that
    passes). reward.py ranks completions by this score; ppo.py --reward=exec optimises it. Pass a
    running execution.Sandbox to reuse its workers. Returns (scores, the sandbox's result rows)."""
    from execution import run_many
    if sandbox is None:
        rows = run_many(problems, samples, timeout=timeout, frac=True)
    else:
        rows = sandbox.run(problems, samples, timeout=timeout, frac=True, progress=False)
    return [float(r["frac"]) for r in rows], rows


def make_comparisons(model, enc, problems, cfg, generator, ctx=nullcontext):
    """Sample K completions per prompt (temperature cfg.temperature, all prompts batched together,
    under the autocast context `ctx`), add the reference solution with cfg.references, and label
    them all with the fraction of unit-test asserts they pass. Returns comparison rows."""
    task_ids = sorted(problems)
    rows = [t for t in task_ids for _ in range(cfg.k)]
    with ctx():
        comps = sample_completions(model, enc, [problems[t]["prompt"] for t in rows], cfg.max_new_tokens,
                                   temperature=cfg.temperature, batch_size=cfg.sample_batch,
                                   generator=generator, desc=f"sample K={cfg.k}")
    texts = [c["completion"] for c in comps]
    n = cfg.k + cfg.references  # completions per prompt
    if cfg.references:
        texts = [c for i, t in enumerate(task_ids)
                 for c in texts[i * cfg.k:(i + 1) * cfg.k] + [problems[t]["canonical_solution"]]]
    samples = [{"task_id": task_ids[j // n], "completion": c} for j, c in enumerate(texts)]
    scores, _ = label(problems, samples, timeout=cfg.timeout)
    return [{"task_id": t, "prompt": problems[t]["prompt"], "completions": texts[i * n:(i + 1) * n],
             "scores": scores[i * n:(i + 1) * n]} for i, t in enumerate(task_ids)]


# ----------------------------------------------------------------------------- training

def evaluate_accuracy(rm, groups, pad_id, batch_size, ctx=nullcontext):
    """Pairwise accuracy and mean loss of the RM over held-out prompts (scored under `ctx`)."""
    correct = total = 0
    losses = []
    was_training = rm.training
    rm.eval()
    with torch.no_grad():
        for b in range(0, len(groups), batch_size):
            batch = groups[b:b + batch_size]
            with ctx():
                loss, rewards = batch_loss(rm, batch, pad_id)
            losses.append(loss.item() * len(batch))
            for r, (_, s) in zip(rewards, batch):
                c, n = pairwise_accuracy(r.float().cpu(), s)
                correct, total = correct + c, total + n
    rm.train(was_training)
    return correct / max(1, total), sum(losses) / max(1, len(groups)), total


@torch.no_grad()
def center_bias(rm, seqs, pad_id, batch_size=64, ctx=nullcontext):
    """Shift the scalar head's bias so the mean score of `seqs` (the reference solutions) is 0
    (InstructGPT §3.5: "the labeler demonstrations achieve a mean score of 0"). seqs: rm_sequence's,
    scored under `ctx`. Returns the old mean."""
    rm.eval()
    with ctx():
        scores = torch.cat([score(rm, seqs[i:i + batch_size], pad_id)
                            for i in range(0, len(seqs), batch_size)])
    mean = scores.mean().item()
    rm.score_head.bias -= mean
    return mean


def round_name(stem, r, suffix):
    """Round 1's file keeps the plain name (comparisons.jsonl, rm.pt); round r > 1 adds _r<r>."""
    return f"{stem}{suffix}" if r == 1 else f"{stem}_r{r}{suffix}"


def sample_round(cfg, out_dir, problems, rt):
    """This round's comparisons: K samples per rm prompt from cfg.policy (SFT in round 1), labelled
    by execution, tagged with the round and the policy, written to comparisons[_r<r>].jsonl."""
    import tokenizer as tok
    t0 = time.time()
    if not 2 <= cfg.k:
        common.die(f"--k={cfg.k}: need at least 2 completions per prompt (InstructGPT: 4..9)")
    policy_path = common.require(cfg.policy or out_dir / "sft.pt", "train that policy first")
    policy, ckpt = load_checkpoint(policy_path, rt.device)
    enc = tok.from_state(ckpt["tokenizer"])
    fresh = make_comparisons(policy, enc, problems, cfg, torch.Generator(rt.device).manual_seed(cfg.seed),
                             rt.autocast)
    del policy
    for r in fresh:
        r.update(round=cfg.round, policy=str(policy_path))
    cmp_path = out_dir / round_name("comparisons", cfg.round, ".jsonl")
    write_comparisons(cmp_path, fresh)
    print(f"comparisons of {policy_path} (round {cfg.round}) -> {cmp_path} ({time.time() - t0:.0f}s)")
    return fresh


def fit(rm, train_groups, pad_id, cfg, rt):
    """InstructGPT's RM training: cfg.epochs over the prompts in a seeded shuffle, cfg.batch_size
    prompts (each with all its completions) per step, warmup + cosine, clipping; the loss and train
    accuracy are read every cfg.log_interval steps. Returns the number of steps."""
    optimizer = common.make_optimizer(rm, cfg.lr, cfg.weight_decay, device=rt.device)
    total = cfg.epochs * ((len(train_groups) + cfg.batch_size - 1) // cfg.batch_size)
    rng = random.Random(cfg.seed)
    rm.train()
    step, correct, seen = 0, 0, 0
    pending, loss_sum, n_steps = [], torch.zeros((), device=rt.device), 0  # on the device until the next log
    bar = tqdm(total=total, desc="reward model", dynamic_ncols=True)
    for epoch in range(cfg.epochs):
        order = list(range(len(train_groups)))
        rng.shuffle(order)
        for b in range(0, len(order), cfg.batch_size):
            batch = [train_groups[i] for i in order[b:b + cfg.batch_size]]
            common.set_lr(optimizer, common.lr_at(step, cfg.lr, cfg.warmup_iters, total, cfg.min_lr_ratio))
            with rt.ctx():
                loss, rewards = batch_loss(rm, batch, pad_id)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(rm.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            pending += [(r.detach(), s) for r, (_, s) in zip(rewards, batch)]
            loss_sum += loss.detach()
            n_steps += 1
            step += 1
            bar.update(1)
            if step % cfg.log_interval and step < total:
                continue  # reading rewards and loss makes the host wait for the GPU: only when logging
            flat = torch.cat([r for r, _ in pending]).float().cpu().split([len(s) for _, s in pending])
            for r, (_, s) in zip(flat, pending):
                c, n = pairwise_accuracy(r, s)
                correct, seen = correct + c, seen + n
            bar.set_postfix(loss=f"{loss_sum.item() / n_steps:.3f}", train_acc=f"{correct / max(1, seen):.3f}")
            pending, loss_sum, n_steps = [], torch.zeros_like(loss_sum), 0
    bar.close()
    return step


def train(cfg, out_dir, comparisons=None):
    """Build (or read) the comparisons, train the RM on them, write out_dir/rm.pt (rm_r<r>.pt in
    round r > 1). `comparisons`: existing comparison files to train on; fresh ones are sampled from
    cfg.policy when there are none or when cfg.policy is set (a flywheel round: the new samples are
    added to the old ones). Returns a summary."""
    import tokenizer as tok
    rt = common.setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    init_path = common.require(cfg.init or out_dir / "sft.pt", "run `python sft.py` first")
    problems = load_problems(out_dir / "tasks" / "rm.jsonl", "run `python data/tasks.py` first")
    t0 = time.time()

    # ---- 1. comparisons: sample K per prompt from the policy (SFT in round 1), label by execution
    rows = [r for path in comparisons or [] for r in read_comparisons(path)]
    fresh = sample_round(cfg, out_dir, problems, rt) if not comparisons or cfg.policy else []
    rows += fresh
    t_label = time.time() - t0

    # ---- 2. the reward model: the SFT trunk with a fresh scalar head (every round: a new RM on all
    #      comparisons so far, not the last RM trained again: InstructGPT's one epoch, and the loglik
    #      term stays the SFT model's likelihood)
    rm, ckpt = load_checkpoint(init_path, rt.device, head="scalar")
    rm.config = dataclasses.replace(rm.config, pool=cfg.pool, loglik=cfg.loglik)
    if cfg.loglik:  # start exactly at the SFT model's mean log-likelihood of the completion
        torch.nn.init.zeros_(rm.score_head.weight)
    enc = tok.from_state(ckpt["tokenizer"])
    eot_id, pad_id = special_ids(enc)
    block = rm.config.block_size
    useful = [r for r in rows if n_pairs(r["scores"]) > 0]  # a prompt whose K scores all tie teaches nothing
    # held-out prompts: split over all the rm prompts, so the split is the same in every round (a file
    # may also rank one prompt more than once: all its rankings fall on one side)
    task_ids = sorted(set(problems) | {r["task_id"] for r in useful})
    train_ids, val_ids = split_holdout(task_ids, round(cfg.holdout * len(task_ids)), cfg.seed)
    val_set = set(val_ids)

    def group(r):
        return [rm_sequence(enc, r["prompt"], c, block, eot_id) for c in r["completions"]], r["scores"]
    if cfg.val_comparisons:  # a fixed held-out set (bench/rm_data_curve.py: the same one for every size)
        val_set, val_ids = set(), []
        val_groups = [group(r) for r in read_comparisons(cfg.val_comparisons) if n_pairs(r["scores"]) > 0]
    else:
        val_groups = [group(r) for r in useful if r["task_id"] in val_set]
    train_groups = [group(r) for r in useful if r["task_id"] not in val_set]
    # this round's fresh comparisons on held-out prompts: the distribution the next PPO will see
    fresh_val = [group(r) for r in fresh if r["task_id"] in val_set and n_pairs(r["scores"]) > 0]
    n_train = sum(n_pairs(s) for _, s in train_groups)
    n_val = sum(n_pairs(s) for _, s in val_groups)
    scores = [s for r in rows for s in r["scores"]]
    print(f"{len(rows)} prompts, mean labeler score {sum(scores) / max(1, len(scores)):.3f}; "
          f"{len(useful)} with at least one comparison: {len(train_groups)} train ({n_train} pairs), "
          f"{len(val_groups)} held out ({n_val} pairs)")
    if not train_groups:
        common.die("no comparisons to train on: every prompt's completions tied (sample more, or raise --k)")

    acc0, _, _ = evaluate_accuracy(rm, val_groups, pad_id, cfg.batch_size, rt.autocast)
    t1 = time.time()
    step = fit(rm, train_groups, pad_id, cfg, rt)
    val_acc, val_loss, _ = evaluate_accuracy(rm, val_groups, pad_id, cfg.batch_size, rt.autocast)
    t_train = time.time() - t1
    shift = {}  # accuracy on this round's fresh held-out comparisons: the previous RM's, then the new one's
    if fresh_val:
        before = acc0
        if cfg.prev_rm:
            prev, _ = load_checkpoint(common.require(cfg.prev_rm, "the previous round's RM"), rt.device)
            before, _, _ = evaluate_accuracy(prev, fresh_val, pad_id, cfg.batch_size, rt.autocast)
            del prev
        after, _, n_fresh = evaluate_accuracy(rm, fresh_val, pad_id, cfg.batch_size, rt.autocast)
        shift = {"rm_accuracy_before": round(before, 4), "rm_accuracy_after": round(after, 4),
                 "n_fresh_val_comparisons": n_fresh}
        print(f"round {cfg.round}: on the held-out comparisons of {cfg.policy or 'sft.pt'}'s samples, "
              f"accuracy {before:.3f} ({cfg.prev_rm or 'before training'}) -> {after:.3f}")

    # ---- 3. normalise: reference solutions of the rm prompts score 0 on average
    refs = [rm_sequence(enc, p["prompt"], p["canonical_solution"], block, eot_id) for p in problems.values()]
    old_mean = center_bias(rm, refs, pad_id, ctx=rt.autocast)

    out_path = out_dir / round_name("rm", cfg.round, ".pt")
    save_checkpoint(out_path, rm, tokenizer=ckpt["tokenizer"], stage="reward", step=step, config=cfg,
                    extra={"val_accuracy": val_acc, "n_comparisons": n_train, "heldout": val_ids})
    if cfg.round == 1:
        common.update_results(out_dir, {"reward_model": {"val_accuracy": round(val_acc, 4),
                                                         "n_comparisons": n_train}})
    common.update_round(out_dir, cfg.round, {"n_comparisons": n_train, "rm_val_accuracy": round(val_acc, 4),
                                             **shift})
    print(f"held-out pairwise accuracy {val_acc:.3f} over {n_val} pairs (before training {acc0:.3f}), "
          f"held-out loss {val_loss:.4f}; reference mean score {old_mean:+.3f} -> 0; "
          f"labels {t_label:.0f}s, training {t_train:.0f}s; checkpoint {out_path}")
    return {**shift, "val_accuracy": val_acc, "val_accuracy_before": acc0, "val_loss": val_loss,
            "n_comparisons": n_train, "n_val_comparisons": n_val, "label_seconds": round(t_label, 1),
            "train_seconds": round(t_train, 1)}


# ----------------------------------------------------------------------------- scoring CLI

def load_reward_model(path, device):
    """(model, checkpoint) of the reward model at path; a one-line error if it is missing or is not one."""
    return common.load_model(path, device, "scalar", "run `python reward.py` first to train the reward model",
                             "a reward model")


def score_file(samples_path, problems_path, ckpt_path, output, device="cpu", ctx=nullcontext):
    """Add `rm_score` to every row of a samples file (task_id, completion); write a new file."""
    import tokenizer as tok
    from data.tasks import read_jsonl, write_jsonl
    common.require(samples_path, "write samples with `python evaluate.py` first")
    rm, ckpt = load_reward_model(ckpt_path, device)
    problems = load_problems(problems_path, "pass --problems FILE")
    samples = list(read_jsonl(samples_path))
    if any(not isinstance(s, dict) or "task_id" not in s or "completion" not in s for s in samples):
        common.die(f"{samples_path}: every row needs task_id and completion")
    try:
        with ctx():
            scores = score_samples(rm, tok.from_state(ckpt["tokenizer"]), problems, samples, progress=True)
    except KeyError as e:
        common.die(f"{samples_path}: {e.args[0]} ({problems_path})")
    write_jsonl(output, [{**s, "rm_score": r} for s, r in zip(samples, scores)])
    print(f"{len(samples)} samples scored -> {output}")


def main(argv=None):
    def extra(p):
        p.add_argument("--comparisons", metavar="FILE[,FILE...]",
                       help="train on these comparisons files (task_id, prompt, completions, scores) "
                            "instead of sampling and labelling new ones (with --policy=PT: as well as)")
        p.add_argument("--score", metavar="SAMPLES",
                       help="do not train: add the RM score (rm_score) to every row of this samples file")
        p.add_argument("--problems", metavar="FILE", help="with --score: the problems the samples answer "
                                                          "(default out_dir/tasks/test.jsonl)")
        p.add_argument("--ckpt", metavar="PT", help="with --score: the reward model (default out_dir/rm.pt)")
        p.add_argument("--output", metavar="FILE", help="with --score: where to write (default SAMPLES_rm.jsonl)")
    common.rank0_only("reward.py")
    cfg, args = common.parse_config(Config, PRESETS, argv, description=__doc__.split("\n\n")[0],
                                    extra_args=extra)
    if args.score:
        s = Path(args.score)
        name = s.name[:-len(".jsonl.gz")] if s.name.endswith(".jsonl.gz") else s.name.removesuffix(".jsonl")
        output = args.output or str(s.with_name(name + "_rm.jsonl"))
        rt = common.setup_runtime(cfg.device, cfg.dtype, cfg.seed)
        score_file(args.score, args.problems or args.out_dir / "tasks" / "test.jsonl",
                   args.ckpt or args.out_dir / "rm.pt", output, rt.device, rt.autocast)
        return
    if cfg.log_interval < 1:
        common.die("--log_interval must be at least 1")
    if cfg.pool not in POOLS:
        common.die(f"--pool={cfg.pool}: one of {', '.join(POOLS)}")
    if not 0 <= cfg.holdout < 1:
        common.die(f"--holdout={cfg.holdout}: a fraction in [0, 1)")
    if cfg.round < 1:
        common.die(f"--round={cfg.round}: rounds count from 1")
    files = [f for f in (args.comparisons or "").split(",") if f]
    train(cfg, args.out_dir, comparisons=files or None)


if __name__ == "__main__":
    main()
