"""Supervised fine-tuning on demonstrations (InstructGPT §3.5 "SFT", Codex-S §4).

The base model is fine-tuned on (prompt, canonical_solution) pairs from the `sft` split of the task
suite. Each example is `encode(prompt) + encode(solution) + [<|endoftext|>]`, prompt and solution
tokenized separately exactly as at sampling time (the prompt is the context, the model continues it).
The loss is next-token cross-entropy on the solution tokens and the end-of-text token only: prompt
positions and right-padding are masked out (Codex-S: "we mask out loss for any tokens in the prompt").
A lower learning rate than pretraining, a few epochs, cosine decay. A slice of the split is held out:
its loss and its greedy pass@1 (samples run in the sandbox) are reported as training goes.

    python sft.py --preset tiny
    python sft.py --preset tiny --epochs=8 --lr=5e-4 --ptx_coef=0.1   # mix in pretraining LM loss

Reads out/<preset>/base.pt and out/<preset>/tasks/sft.jsonl; writes out/<preset>/sft.pt (stage
"sft") and a log out/<preset>/logs/sft.jsonl.
"""
import json
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
from data.tasks import load_problems
from engine import sample_completions
from model import load_checkpoint, save_checkpoint
from tokenizer import special_ids


@dataclass
class Config:
    epochs: int = 4
    batch_size: int = 16           # demonstrations per step
    lr: float = 1e-3               # pretraining uses 2e-3 (tiny)
    min_lr_ratio: float = 0.1
    warmup_iters: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    holdout: int = 64              # sft problems held out for loss and pass@1 (not trained on)
    eval_every: int = 1            # evaluate the held-out slice every this many epochs (0: only at the end)
    eval_at_start: bool = True     # also evaluate the base model before training
    max_new_tokens: int = 128      # for the held-out pass@1 samples (greedy)
    ptx_coef: float = 0.0          # weight of a pretraining LM loss mixed into every step (0: off)
    ptx_batch_size: int = 4        # pretraining windows (of block_size tokens) per step when ptx_coef > 0
    timeout: float = 3.0           # seconds per program in the sandbox
    log_interval: int = 1          # read loss and grad norm (a host-device sync) every this many steps
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 1337


PRESETS = {
    "tiny": {},
    "small": dict(epochs=8, batch_size=32, lr=1e-4, warmup_iters=50, holdout=128, max_new_tokens=256,
                  log_interval=10),
}


# ----------------------------------------------------------------------------- the loss

def masked_lm_loss(logits, targets, mask):
    """Mean next-token cross-entropy over the positions where `mask` is True (InstructGPT §3.5 SFT,
    Codex-S §4: the loss covers the completion tokens only; prompt and padding are masked out).

    logits (B, T, V), or (N, V) at just the N masked-in positions (model(x, logits_at=mask): what
    training uses, since the unembedding is the costliest matmul here and a demonstration's
    completion is about a quarter of its tokens); targets (B, T) ids (any value where masked, -1
    included), mask (B, T) bool. The mean is over all unmasked tokens of the batch. A batch with no
    unmasked token gives 0 (finite, with a zero gradient), never NaN."""
    mask = mask.bool()
    if logits.dim() == 3:
        logits = logits[mask]
    ce = F.cross_entropy(logits.float(), targets[mask].clamp(min=0), reduction="sum")
    return ce / mask.sum().clamp(min=1)


# ----------------------------------------------------------------------------- data

def encode_example(enc, prompt, completion, eot_id):
    """One demonstration as token ids: encode(prompt) + encode(completion) + [eot], the two parts
    tokenized separately (as at sampling time). Returns (tokens, n_prompt)."""
    p = enc.encode_ordinary(prompt)
    return p + enc.encode_ordinary(completion) + [eot_id], len(p)


def collate(examples, pad_id):
    """Right-pad examples [(tokens, n_prompt), ...] into inputs x, targets y and loss mask (B, T).

    y[b, t] is the token after x[b, t]; it is trained on only when that token belongs to the
    completion (t + 1 >= n_prompt) and is not padding. Masked targets are -1."""
    T = max(len(t) for t, _ in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), -1, dtype=torch.long)
    for b, (tokens, n_prompt) in enumerate(examples):
        seq = torch.tensor(tokens, dtype=torch.long)
        n = len(tokens) - 1
        x[b, :n] = seq[:-1]
        y[b, n_prompt - 1:n] = seq[n_prompt:]
    return x, y, y != -1


def split_holdout(task_ids, n, seed):
    """A deterministic (train, held-out) split of task ids: n held out, at most half of them."""
    ids = sorted(task_ids)
    random.Random(seed).shuffle(ids)
    n = min(n, len(ids) // 2)
    return ids[n:], ids[:n]


# ----------------------------------------------------------------------------- sampling + pass@1

def pass_at_1(model, enc, problems, task_ids, max_new_tokens, timeout=3.0, ctx=nullcontext):
    """Greedy pass@1 on `task_ids`: one greedy completion per problem (sampled under the autocast
    context `ctx`), run against its tests."""
    from execution import run_many
    prompts = [problems[t]["prompt"] for t in task_ids]
    with ctx():
        comps = sample_completions(model, enc, prompts, max_new_tokens, temperature=0.0)
    texts = [c["completion"] for c in comps]
    samples = [{"task_id": t, "completion": c} for t, c in zip(task_ids, texts)]
    results = run_many(problems, samples, timeout=timeout, progress=False)
    return sum(r["passed"] for r in results) / max(1, len(results))


@torch.no_grad()
def heldout_loss(model, batches, ctx):
    """Masked LM loss over the held-out demonstrations (token-weighted mean)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y, m in batches:
        with ctx():
            logits, _ = model(x, logits_at=m)
        n = int(m.sum())
        total += masked_lm_loss(logits, y, m).item() * n
        count += n
    model.train(was_training)
    return total / max(1, count)


# ----------------------------------------------------------------------------- training

def train(cfg, out_dir):
    """Fine-tune out_dir/base.pt on out_dir/tasks/sft.jsonl; write out_dir/sft.pt. Returns a summary."""
    import tokenizer as tok
    rt = common.setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    base_path = common.require(out_dir / "base.pt", "run `python pretrain.py` first")
    problems = load_problems(out_dir / "tasks" / "sft.jsonl", "run `python data/tasks.py` first")
    try:
        model, ckpt = load_checkpoint(base_path, rt.device)
    except ValueError as e:
        common.die(str(e))
    enc = tok.from_state(ckpt["tokenizer"])
    eot_id, pad_id = special_ids(enc)
    block = model.config.block_size

    # ---- demonstrations: encode, drop those longer than the context, hold out a slice
    train_ids, val_ids = split_holdout(problems, cfg.holdout, cfg.seed)
    examples, too_long = {}, 0
    for tid, p in problems.items():
        ex = encode_example(enc, p["prompt"], p["canonical_solution"], eot_id)
        if len(ex[0]) - 1 > block:
            too_long += 1
            continue
        examples[tid] = ex
    train_ex = [examples[t] for t in train_ids if t in examples]
    val_ex = [examples[t] for t in val_ids if t in examples]
    if not train_ex:
        common.die(f"no sft demonstration fits the context of {block} tokens")
    val_batches = [tuple(t.to(rt.device) for t in collate(val_ex[i:i + cfg.batch_size], pad_id))
                   for i in range(0, len(val_ex), cfg.batch_size)]
    n_tok = sum(len(t) - n for t, n in train_ex)
    print(f"sft: {len(train_ex)} demonstrations ({n_tok:,} completion tokens), {len(val_ex)} held out"
          + (f", {too_long} longer than the context dropped" if too_long else ""))

    ptx_tokens = None
    if cfg.ptx_coef > 0:
        ptx_tokens = common.load_code_tokens(out_dir / "code", "train")
    gen = torch.Generator().manual_seed(cfg.seed)
    optimizer = common.make_optimizer(model, cfg.lr, cfg.weight_decay, device=rt.device)
    steps_per_epoch = (len(train_ex) + cfg.batch_size - 1) // cfg.batch_size
    total = cfg.epochs * steps_per_epoch
    log_path = out_dir / "logs" / "sft.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")

    def evaluate(step):
        row = {"step": step, "seconds": round(time.time() - t0, 1), "val_loss": heldout_loss(model, val_batches, rt.autocast) if val_batches else None}
        if val_ex:
            row["val_pass@1"] = pass_at_1(model, enc, problems, val_ids, cfg.max_new_tokens, cfg.timeout,
                                          rt.autocast)
        log.write(json.dumps(row) + "\n")
        log.flush()
        if row["val_loss"] is not None:
            tqdm.write(f"step {step}: held-out loss {row['val_loss']:.4f}, "
                       f"held-out pass@1 {row['val_pass@1']:.3f} (greedy, {len(val_ids)} problems)")
        return row

    t0 = time.time()
    first = evaluate(0) if cfg.eval_at_start else None
    last = None
    model.train()
    step = 0
    bar = tqdm(total=total, desc="sft", dynamic_ncols=True)
    rng = random.Random(cfg.seed)
    loss_sum, n_steps = torch.zeros((), device=rt.device), 0  # on the device until the next log
    for epoch in range(cfg.epochs):
        order = list(range(len(train_ex)))
        rng.shuffle(order)
        for s in range(0, len(order), cfg.batch_size):
            lr = common.lr_at(step, cfg.lr, cfg.warmup_iters, total, cfg.min_lr_ratio)
            common.set_lr(optimizer, lr)
            x, y, m = (t.to(rt.device) for t in collate([train_ex[i] for i in order[s:s + cfg.batch_size]], pad_id))
            with rt.ctx():
                logits, _ = model(x, logits_at=m)  # (N, V): the completion tokens' positions only
                loss = masked_lm_loss(logits, y, m)
                if ptx_tokens is not None:  # PPO-ptx style: keep the pretraining distribution in view
                    px, py = common.get_batch(ptx_tokens, cfg.ptx_batch_size, block, gen, rt.device)
                    _, ptx_loss = model(px, py)
                    loss = loss + cfg.ptx_coef * ptx_loss
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_sum += loss.detach()
            n_steps += 1
            bar.update(1)
            if step % cfg.log_interval and s + cfg.batch_size < len(order):
                continue  # reading the loss makes the host wait for the GPU: only when logging
            mean_loss = loss_sum.item() / n_steps
            loss_sum, n_steps = torch.zeros_like(loss_sum), 0
            log.write(json.dumps({"step": step, "epoch": epoch, "loss": mean_loss, "lr": lr,
                                  "grad_norm": float(norm)}) + "\n")
            post = dict(epoch=epoch + 1, loss=f"{mean_loss:.3f}")
            if last is not None and last["val_loss"] is not None:
                post.update(val_loss=f"{last['val_loss']:.3f}", val_pass1=f"{last['val_pass@1']:.2f}")
            bar.set_postfix(post)
        if epoch == cfg.epochs - 1 or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
            last = evaluate(step)
    bar.close()
    log.close()
    seconds = time.time() - t0

    out_path = out_dir / "sft.pt"
    save_checkpoint(out_path, model, tokenizer=ckpt["tokenizer"], stage="sft", step=step, config=cfg,
                    extra={"heldout": val_ids, "val_loss": last["val_loss"]})
    summary = {"seconds": round(seconds, 1), "steps": step, "val_loss": last["val_loss"],
               "val_pass@1": last.get("val_pass@1"),
               "base_val_pass@1": first.get("val_pass@1") if first else None}
    if last["val_loss"] is not None:
        before = f" (base {summary['base_val_pass@1']:.3f})" if first else ""
        print(f"held-out loss {last['val_loss']:.4f}, held-out pass@1 {summary['val_pass@1']:.3f}{before}")
    print(f"done in {seconds:.0f}s: {step} steps; checkpoint {out_path}")
    return summary


def main(argv=None):
    common.rank0_only("sft.py")
    cfg, args = common.parse_config(Config, PRESETS, argv, description=__doc__.split("\n\n")[0])
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.log_interval < 1:
        common.die("--epochs, --batch_size and --log_interval must be at least 1")
    train(cfg, args.out_dir)


if __name__ == "__main__":
    main()
