"""Plumbing shared by every stage script: config CLI, output paths, device / DDP setup, autocast,
the learning-rate schedule and the optimizer. Nothing here is an algorithm; the algorithms live in
the stage scripts that use them.

Config CLI (every stage): each script declares a `Config` dataclass with the defaults of the `tiny`
preset and a `PRESETS` dict of overrides per preset. On the command line:

    python stage.py --preset small --out_dir out/exp1 --lr=3e-4 --compile=true
"""
import argparse
import dataclasses
import json
import math
import os
import sys
from contextlib import nullcontext
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

ROOT = Path(__file__).resolve().parent


def die(msg):
    """A clear one-line error for bad input, then exit(2)."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------- config CLI

def _parse_value(text, default, name):
    """Parse a --name=value string into the type of the field's default."""
    kind = type(default)
    try:
        if isinstance(default, bool):
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if default is None:  # untyped optional: guess
            for cast in (int, float):
                try:
                    return cast(text)
                except ValueError:
                    pass
            return None if text.lower() == "none" else text
        if isinstance(default, (list, tuple)):
            items = [s for s in text.split(",") if s != ""]
            inner = type(default[0]) if default else str
            return kind(inner(s) for s in items)
        return kind(text)
    except ValueError:
        die(f"--{name}={text}: expected a {kind.__name__}")


def parse_config(config_cls, presets, argv=None, description=None, extra_args=None):
    """Build a config from `--preset`, `--out_dir` and `--name=value` overrides.

    Returns (config, args): `args` holds `preset`, `out_dir` (a Path, default out/<preset>) and any
    `extra_args` the script registered (a callable taking the ArgumentParser).
    """
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    defaults = config_cls()
    epilog = "config fields (override with --name=value; tiny defaults shown):\n" + "\n".join(
        f"  --{n}={getattr(defaults, n)!r}" for n in fields)
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(presets),
                        help="size preset: tiny (CPU, minutes) or small (one GPU)")
    parser.add_argument("--out_dir", default=None, help="stage outputs and inputs (default out/<preset>)")
    if extra_args:
        extra_args(parser)
    args, rest = parser.parse_known_args(argv)
    overrides = {}
    for item in rest:
        if not item.startswith("--"):
            parser.error(f"unrecognized argument {item!r} (config overrides are --name=value)")
        name, text = item[2:].split("=", 1) if "=" in item else (item[2:], None)
        name = name.replace("-", "_")
        if text is None:  # a bare --flag sets a boolean field
            if not isinstance(getattr(defaults, name, None), bool):
                parser.error(f"--{name} needs a value (--{name}=...)")
            text = "true"
        if name not in fields:
            parser.error(f"unknown config field --{name} (see --help for the list)")
        overrides[name] = text
    values = dict(presets[args.preset])
    for name, text in overrides.items():
        default = values.get(name, getattr(defaults, name))
        values[name] = _parse_value(text, default, name)
    config = config_cls(**values)
    args.out_dir = Path(args.out_dir) if args.out_dir else ROOT / "out" / args.preset
    return config, args


def _merge(dst, src):
    """Deep-merge dict src into dst (nested dicts merged, anything else replaced)."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def edit_results(out_dir, edit):
    """Apply `edit` (a function that changes a dict in place) to out_dir/results.json (the run's
    summary, docs/DESIGN.md) and write it back atomically. run.sh runs some stages at the same time, so
    each read-edit-write holds an exclusive lock on results.json.lock: no update is lost."""
    path = Path(out_dir) / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".json.lock"), "a") as lock:
        if fcntl is not None:  # (POSIX; elsewhere stages run one at a time)
            fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(path.read_text()) if path.exists() else {}
        edit(results)
        tmp = path.with_suffix(f".json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(tmp, path)
    return results


def update_results(out_dir, update):
    """Deep-merge `update` into out_dir/results.json."""
    return edit_results(out_dir, lambda results: _merge(results, update))


def update_round(out_dir, r, update):
    """Deep-merge `update` into flywheel round r's entry of results.json's `rounds` (a list, one
    entry per round, sorted by round)."""
    def edit(results):
        entries = {e["round"]: e for e in results.get("rounds", [])}
        _merge(entries.setdefault(r, {"round": r}), update)
        results["rounds"] = [entries[k] for k in sorted(entries)]
    return edit_results(out_dir, edit)


def add_seconds(out_dir, key, seconds):
    """results.json's seconds[key] += seconds (run.sh: each stage's wall time; resumed runs add up)."""
    def edit(results):
        spent = results.setdefault("seconds", {})
        spent[key] = spent.get(key, 0) + seconds
    return edit_results(out_dir, edit)


def require(path, hint):
    """Exit with a one-line error if an input file another stage should have written is missing."""
    path = Path(path)
    if not path.exists():
        die(f"{path} not found: {hint}")
    return path


def load_model(path, device, head, hint, what):
    """(model, checkpoint) at path, whose head must be `head` ("lm" or "scalar"); a one-line error if
    the file is missing (with `hint`), is not a flywheel checkpoint, or has another head (not `what`)."""
    from model import load_checkpoint
    require(path, hint)
    try:
        model, ckpt = load_checkpoint(path, device)
    except ValueError as e:
        die(str(e))
    if model.config.head != head:
        die(f"{path} is a {model.config.head}-head model, not {what}")
    return model, ckpt


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend, or None when matplotlib is not installed:
    figures are optional, and every stage that draws one skips it without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


# ----------------------------------------------------------------------------- device, DDP, autocast

@dataclasses.dataclass
class Runtime:
    device: str
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    master: bool
    autocast: object  # a context manager factory

    def ctx(self):
        return self.autocast()


DTYPES = ("auto", "float32", "bfloat16")  # float16 would need a GradScaler (loss scaling): not offered


def check_dtype(dtype, device):
    """A one-line error for a --dtype this code cannot train in: float16 autocast without a
    GradScaler lets small gradients underflow to zero, so only bfloat16 (same exponent range as
    float32) and float32 are accepted; bfloat16 on a GPU that lacks it is refused too."""
    import torch
    if dtype == "float16":
        die("--dtype=float16 is not supported (it needs a GradScaler, which flywheel does not use): "
            "use --dtype=bfloat16 or --dtype=float32")
    if dtype not in DTYPES:
        die(f"--dtype={dtype}: one of {', '.join(DTYPES)}")
    if dtype == "bfloat16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        die("--dtype=bfloat16: this GPU has no bfloat16; use --dtype=float32")


def rank0_only(script):
    """For the stages that run on one process (every stage but pretrain.py): under torchrun, ranks
    other than 0 exit at once with status 0 (torchrun waits for rank 0), and rank 0 runs alone, as
    a plain single process (no process group is started), so no two processes write the same files."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return
    if int(os.environ.get("RANK", "0")) != 0:
        sys.exit(0)
    print(f"note: {script} runs on one process; under torchrun rank 0 does the whole job and the "
          f"other {world - 1} rank(s) exit (only pretrain.py uses DDP)", file=sys.stderr)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK"):
        os.environ.pop(key, None)


def setup_runtime(device="auto", dtype="auto", seed=1337):
    """Pick the device, start DDP under torchrun (gloo on CPU, nccl on CUDA) and build the autocast
    context: bf16 on CUDA, plain fp32 on CPU by default; --dtype=bfloat16 also autocasts on the CPU
    (slow there without native bf16 matmuls: for tests of the mixed-precision paths)."""
    import torch
    import torch.distributed as dist
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_dtype(dtype, device)
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world_size = 0, 0, 1
    if ddp:
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        # imported before the group exists: DDP imports torch._dynamo on first use, and modules loaded
        # then take the live default group as a default argument, which keeps it (and gloo's threads)
        # alive after destroy_process_group, until the interpreter finalizes (see cleanup_runtime)
        import torch._dynamo  # noqa: F401
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # one thread per core, split among ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    torch.manual_seed(seed + rank)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "float32":
        autocast = nullcontext
    else:
        autocast = lambda: torch.autocast(device_type="cuda" if "cuda" in device else "cpu", dtype=torch.bfloat16)
    return Runtime(device, ddp, rank, local_rank, world_size, rank == 0, autocast)


def any_rank(flag, rt):
    """True on every rank if `flag` is true on any rank (a collective under DDP: every rank must
    call it at the same point). Used for decisions each rank would otherwise take from its own
    clock, such as pretrain.py's --max_seconds stop."""
    if not rt.ddp:
        return bool(flag)
    import torch
    import torch.distributed as dist
    t = torch.tensor([1.0 if flag else 0.0], device=rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def cleanup_runtime(rt):
    """End DDP, on every rank, after its last collective and before the interpreter exits. The caller
    drops its DDP wrapper first (it holds the process group). A barrier, so that no rank tears down
    while another still talks to it; then destroy_process_group and a garbage collection, which frees
    the process group itself and so joins its backend's threads now. For gloo, destroy_process_group
    alone only unregisters the group: its worker threads live on until the last reference goes, and
    such a thread can still be releasing its last collective's tensors (Python objects) after the
    main thread has moved on. If that happens while the interpreter finalizes, the thread cannot take
    the GIL, is made to exit inside a destructor, and the process aborts ("terminate called without
    an active exception")."""
    if not rt.ddp:
        return
    import gc

    import torch.distributed as dist
    dist.barrier(device_ids=[rt.local_rank] if rt.device.startswith("cuda") else None)
    dist.destroy_process_group()
    gc.collect()


# ----------------------------------------------------------------------------- optimisation

def lr_at(step, max_lr, warmup, total, min_ratio=0.1):
    """Linear warmup to max_lr, then cosine decay to min_ratio * max_lr at `total`."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= total:
        return max_lr * min_ratio
    progress = (step - warmup) / max(1, total - warmup)
    return max_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.95), device="cpu"):
    """AdamW with weight decay on matrices (dim >= 2) only: not on biases, norms or gains."""
    import torch
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = device.startswith("cuda")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def mfu(flops_per_token, tokens_per_s, peak, world_size=1):
    """Model FLOPs utilisation: achieved training FLOP/s over the peak of all the GPUs that
    produced them (tokens_per_s counts the tokens of every rank, so the peak is world_size GPUs')."""
    return flops_per_token * tokens_per_s / (peak * world_size)


def set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g["lr"] = lr


# ----------------------------------------------------------------------------- pretraining data

def load_code_tokens(code_dir, split):
    """The tokenized code corpus (data/code.py --tokenize) as a read-only memmap."""
    import numpy as np
    code_dir = Path(code_dir)
    path = require(code_dir / f"{split}.bin", "run `python data/code.py` and its --tokenize step first")
    meta_path = code_dir / "meta.json"
    dtype = json.loads(meta_path.read_text()).get("dtype", "uint16") if meta_path.exists() else "uint16"
    return np.memmap(path, dtype=np.dtype(dtype), mode="r")


def get_batch(tokens, batch_size, block_size, generator, device="cpu"):
    """Random windows of block_size + 1 tokens: inputs x and next-token targets y, both views of one
    (B, block_size + 1) batch. On CUDA that batch is pinned while still contiguous and copied with
    non_blocking=True, then sliced on the device (pinning a non-contiguous slice buys nothing: the
    copy first makes a contiguous, pageable duplicate and then blocks the host)."""
    import numpy as np
    import torch
    ix = torch.randint(len(tokens) - block_size - 1, (batch_size,), generator=generator).tolist()
    xy = torch.from_numpy(np.stack([tokens[i:i + block_size + 1].astype(np.int64) for i in ix]))
    if str(device).startswith("cuda"):
        xy = xy.pin_memory().to(device, non_blocking=True)
    else:
        xy = xy.to(device)
    return xy[:, :-1], xy[:, 1:]


def code_loss(model, tokens, batch_size, block_size, iters, device="cpu", ctx=nullcontext, seed=0):
    """Mean LM loss over `iters` fixed random batches of held-out code (same batches every call,
    so numbers are comparable across checkpoints: the alignment tax is measured with this)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for _ in range(iters):
            x, y = get_batch(tokens, batch_size, block_size, g, device)
            with ctx():
                _, loss = model(x, y)
            total = total + loss.float()  # summed on the device: one host read at the end
    model.train(was_training)
    return float(total) / iters
