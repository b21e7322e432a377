"""Pretrain a GPT from scratch on Python code (Codex §3): next-token cross-entropy on the memmapped
corpus that data/code.py wrote, AdamW (decay on matrices only), linear warmup + cosine decay,
gradient clipping and accumulation, bf16 autocast on CUDA, optional torch.compile, DDP under torchrun.

    python pretrain.py --preset tiny
    torchrun --nproc_per_node=2 pretrain.py --preset tiny          # DDP (gloo on CPU, nccl on GPU)
    python pretrain.py --preset tiny --resume                      # continue from out/tiny/base.pt

Writes out/<preset>/base.pt (with optimizer and RNG state for an exact resume), a loss log
out/<preset>/logs/pretrain.jsonl, and models.base.val_loss in results.json.
"""
import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

import common
from model import GPT, GPTConfig, flops_per_token, load_checkpoint, peak_flops, save_checkpoint


@dataclass
class Config:
    # model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 256
    dropout: float = 0.0
    # optimisation
    batch_size: int = 16          # sequences per micro-step (per process)
    grad_accum: int = 1           # micro-steps per optimizer step (per process)
    max_iters: int = 800
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_iters: int = 50
    weight_decay: float = 0.1
    beta2: float = 0.95
    grad_clip: float = 1.0
    # evaluation and checkpoints
    eval_interval: int = 200
    eval_iters: int = 20
    log_interval: int = 1         # read loss and grad norm (a host-device sync) every this many steps
    max_seconds: float = 0.0      # stop early after this much training time (0 = no limit; checked
                                  # when logging, and agreed on by all DDP ranks)
    # runtime
    device: str = "auto"
    dtype: str = "auto"           # auto: bfloat16 on CUDA, float32 on CPU
    compile: bool = False
    seed: int = 1337


PRESETS = {
    "tiny": {},
    "small": dict(n_layer=8, n_head=8, n_embd=512, block_size=512, batch_size=32, grad_accum=4,
                  max_iters=5000, lr=1e-3, warmup_iters=200, eval_interval=500, eval_iters=50,
                  log_interval=10),
}


def train(cfg, out_dir, resume=False, stop_at=None):
    """The training loop. Returns the list of (step, train loss) it logged. `stop_at` ends the run
    early after that step's checkpoint, as an interruption would (tests resume from there)."""
    import tokenizer as tok
    rt = common.setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    code_dir = out_dir / "code"
    train_tokens = common.load_code_tokens(code_dir, "train")
    val_tokens = common.load_code_tokens(code_dir, "val")
    enc = tok.load(common.require(out_dir / "tokenizer.json", "run `python tokenizer.py` first"))
    tok_state = tok.to_state(enc)
    ckpt_path = out_dir / "base.pt"

    # ---- model, optimizer, and the batch sampler's RNG (its state is checkpointed)
    start_step, gen = 0, torch.Generator().manual_seed(cfg.seed + rt.rank)
    if resume:  # read on the CPU: the sampler's RNG state must stay a CPU ByteTensor (the
        # optimizer state follows the parameters to the device in load_state_dict)
        common.require(ckpt_path, "nothing to resume from")
        model, ckpt = load_checkpoint(ckpt_path, "cpu")
        model.to(rt.device)
        if ckpt["tokenizer"] != tok_state:
            common.die(f"{ckpt_path} was trained with a different tokenizer than {out_dir / 'tokenizer.json'}")
        start_step = ckpt["step"]
        gen.set_state(ckpt["rng"][rt.rank])
    else:
        mcfg = GPTConfig(vocab_size=enc.n_vocab, block_size=cfg.block_size, n_layer=cfg.n_layer,
                         n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout)
        model = GPT(mcfg).to(rt.device)
    optimizer = common.make_optimizer(model, cfg.lr, cfg.weight_decay, (0.9, cfg.beta2), rt.device)
    if resume:
        optimizer.load_state_dict(ckpt["optimizer"])
    raw_model = model
    n_params = model.num_params()
    if cfg.compile:
        model = torch.compile(model)
    if rt.ddp:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.local_rank] if rt.device.startswith("cuda") else None)

    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * rt.world_size  # all ranks
    flops_tok = flops_per_token(raw_model.config, cfg.block_size, n_params)
    peak = peak_flops(rt.device)
    if rt.master:
        print(f"model: {n_params / 1e6:.2f}M parameters (non-embedding), vocab {enc.n_vocab}; "
              f"{tokens_per_step} tokens/step; train {len(train_tokens):,} tokens, val {len(val_tokens):,}")
    log_path = out_dir / "logs" / "pretrain.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if rt.master and not resume:
        log_path.write_text("")
    history = []

    def evaluate():
        return common.code_loss(raw_model, val_tokens, cfg.batch_size, cfg.block_size, cfg.eval_iters,
                                rt.device, rt.autocast)

    def checkpoint(step, val_loss):
        rngs = [gen.get_state()]
        if rt.ddp:  # every rank's sampler state, so a resumed DDP run draws the same batches
            import torch.distributed as dist
            rngs = [None] * rt.world_size
            dist.all_gather_object(rngs, gen.get_state())
        if rt.master:
            save_checkpoint(ckpt_path, raw_model, tokenizer=tok_state, stage="pretrain", step=step,
                            config=cfg, optimizer=optimizer, extra={"rng": rngs, "val_loss": val_loss})

    # ---- the loop. Loss and grad norm stay on the device between logs: reading them (.item())
    # makes the host wait for the GPU, so it happens every log_interval steps, not every micro-step.
    model.train()
    bar = tqdm(range(start_step, cfg.max_iters), initial=start_step, total=cfg.max_iters,
               desc="pretrain", disable=not rt.master, dynamic_ncols=True)
    t_start, t_last, val_loss = time.time(), time.time(), None
    loss_sum, n_steps = torch.zeros((), device=rt.device), 0  # since the last log
    for step in bar:
        lr = common.lr_at(step, cfg.lr, cfg.warmup_iters, cfg.max_iters, cfg.min_lr_ratio)
        common.set_lr(optimizer, lr)
        for micro in range(cfg.grad_accum):
            x, y = common.get_batch(train_tokens, cfg.batch_size, cfg.block_size, gen, rt.device)
            sync = nullcontext() if (not rt.ddp or micro == cfg.grad_accum - 1) else model.no_sync()
            with sync, rt.ctx():
                _, loss = model(x, y)
                loss = loss / cfg.grad_accum
            loss.backward()
            loss_sum += loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        n_steps += 1

        end = step == cfg.max_iters - 1 or step + 1 == stop_at
        evaluating = (step + 1) % cfg.eval_interval == 0 or end
        if not (evaluating or (step + 1) % cfg.log_interval == 0):
            continue
        train_loss = loss_sum.item() / n_steps  # mean over the steps since the last log
        now = time.time()
        tok_s = tokens_per_step * n_steps / max(now - t_last, 1e-9)
        t_last, loss_sum, n_steps = now, torch.zeros_like(loss_sum), 0
        history.append((step, train_loss))
        post = dict(loss=f"{train_loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tok_s:,.0f}")
        if peak:
            post["mfu"] = f"{100 * common.mfu(flops_tok, tok_s, peak, rt.world_size):.1f}%"
        bar.set_postfix(post)
        if rt.master:
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, "loss": train_loss, "lr": lr, "grad_norm": float(norm),
                                    "tokens_per_s": tok_s}) + "\n")
        # every rank must stop at the same step (one leaving early for the evaluation and the
        # checkpoint's all_gather while another is in the next backward's all-reduce deadlocks):
        # the time limit is decided together
        out_of_time = bool(cfg.max_seconds) and common.any_rank(now - t_start > cfg.max_seconds, rt)
        last = end or out_of_time
        if evaluating or last:
            val_loss = evaluate()
            if rt.master:
                tqdm.write(f"step {step + 1}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")
            checkpoint(step + 1, val_loss)
        if last:
            break
    bar.close()
    if rt.master and val_loss is not None:
        elapsed = time.time() - t_start
        print(f"done: val loss {val_loss:.4f} in {elapsed:.0f}s; checkpoint {ckpt_path}")
        common.update_results(out_dir, {"models": {"base": {"val_loss": round(val_loss, 4)}}})
    del model  # the DDP wrapper holds the process group: cleanup_runtime frees both
    common.cleanup_runtime(rt)
    return history


def main(argv=None):
    cfg, args = common.parse_config(
        Config, PRESETS, argv, description=__doc__.split("\n\n")[0],
        extra_args=lambda p: p.add_argument("--resume", action="store_true",
                                            help="continue from out_dir/base.pt (exactly)"))
    if cfg.n_embd % cfg.n_head:
        common.die(f"n_embd {cfg.n_embd} is not a multiple of n_head {cfg.n_head}")
    if cfg.log_interval < 1 or cfg.eval_interval < 1:
        common.die("--log_interval and --eval_interval must be at least 1")
    train(cfg, args.out_dir, resume=args.resume)


if __name__ == "__main__":
    main()
