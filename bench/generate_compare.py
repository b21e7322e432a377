"""Our sampler (engine.generate) side by side with HF transformers' GPT2LMHeadModel.generate, same
shapes, random weights, in one process: tokens/s of each and their ratio.

Both models have the same size (n_layer, n_head, n_embd, vocab, positions), both keep a KV cache and
sample at temperature 1 from the full distribution (no top-k / top-p), and both produce exactly
`new_tokens` tokens per row (no stop string, no end-of-text: HF gets min_new_tokens = max_new_tokens
and no eos). The runs alternate (ours, HF, HF, ours, ...) after one warm-up each, so the other jobs
on a shared CPU slow both alike; the ratio reported is the median of the per-repeat ratios.

Needs the optional `transformers` package (not a project requirement):

    pip install transformers          # with the CPU torch already installed
    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 OMP_WAIT_POLICY=PASSIVE \\
        python bench/generate_compare.py                                   # tiny: 4 x 128, vocab 4096
    ... python bench/generate_compare.py --preset small --batch 16 --prompt_len 128 --new_tokens 64

(run.sh sets the same environment: glibc keeps freed blocks, OpenMP threads sleep while waiting.)
On a small CPU shared with other jobs the per-repeat ratio varies a lot (docs/SPEED.md); --threads 1
takes the waits for a descheduled second OpenMP thread out of it.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from engine import generate  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

PRESETS = {  # pretrain.py's model shapes, with the vocabulary sizes the tokenizers are trained to
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, vocab_size=4096, block_size=256),
    "small": dict(n_layer=8, n_head=8, n_embd=512, vocab_size=16384, block_size=512),
}


def hf_model(cfg):
    """GPT2LMHeadModel of the same size as `cfg` (random weights), or exit if transformers is missing."""
    try:
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        sys.exit("error: the optional transformers package is missing: `pip install transformers`")
    transformers.logging.set_verbosity_error()  # its padding advice: our prompts have no padding
    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, bos_token_id=0, eos_token_id=None,
                        pad_token_id=0)
    return GPT2LMHeadModel(hf_cfg).eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=PRESETS, default="tiny", help="model shape (flags below override)")
    for k in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
        ap.add_argument(f"--{k}", type=int, default=None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each (after one warm-up each)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    shape = dict(PRESETS[args.preset])
    shape.update({k: getattr(args, k) for k in shape if getattr(args, k) is not None})
    shape["block_size"] = max(shape["block_size"], args.prompt_len + args.new_tokens)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = GPTConfig(**shape)
    ours = GPT(cfg).eval()
    theirs = hf_model(cfg)
    B, P, N = args.batch, args.prompt_len, args.new_tokens
    prompts = torch.randint(1, cfg.vocab_size, (B, P))
    prompt_lists = prompts.tolist()
    attention = torch.ones_like(prompts)
    g = torch.Generator().manual_seed(args.seed)

    def run_ours():
        gen = generate(ours, prompt_lists, N, temperature=1.0, generator=g)
        assert all(len(t) == N for t in gen.tokens)

    def run_hf():
        with torch.no_grad():
            out = theirs.generate(prompts, attention_mask=attention, do_sample=True, temperature=1.0,
                                  top_k=0, top_p=1.0, min_new_tokens=N, max_new_tokens=N, use_cache=True,
                                  pad_token_id=0, eos_token_id=None)
        assert out.shape == (B, P + N), out.shape

    def timed(fn):
        t = time.perf_counter()
        fn()
        return B * N / (time.perf_counter() - t)

    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in theirs.parameters())
    print(f"shape: {cfg.n_layer} layers x {cfg.n_embd} ({cfg.n_head} heads), vocab {cfg.vocab_size}, "
          f"batch {B}, prompt {P} + {N} new tokens; params ours {n_ours / 1e6:.2f}M, HF {n_hf / 1e6:.2f}M; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    timed(run_ours), timed(run_hf)  # warm-up
    rows = []
    for r in range(args.repeats):
        order = (run_ours, run_hf) if r % 2 == 0 else (run_hf, run_ours)
        tps = {fn: timed(fn) for fn in order}
        rows.append((tps[run_ours], tps[run_hf]))
        print(f"  repeat {r}: ours {tps[run_ours]:8.0f} tok/s   HF {tps[run_hf]:8.0f} tok/s   "
              f"ratio {tps[run_ours] / tps[run_hf]:.2f}")
    ours_med = statistics.median(o for o, _ in rows)
    hf_med = statistics.median(h for _, h in rows)
    ratio = statistics.median(o / h for o, h in rows)
    print(f"median: ours {ours_med:.0f} tok/s, HF {hf_med:.0f} tok/s, ours / HF = {ratio:.2f}x")


if __name__ == "__main__":
    main()
