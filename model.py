"""The GPT shared by every stage: a pre-LN decoder-only transformer (GPT-2 style) with

- attention through F.scaled_dot_product_attention (causal; a boolean mask when rows are left-padded),
- a KV cache, and a plain batched `generate` (temperature, top-k, top-p, stop strings, end of
  text) that returns the sampled tokens and their log-probs: the reference that engine.py's fast
  sampler, which the stages use, is tested against,
- a tied unembedding, or a scalar head in its place for the reward and value models,
- a FLOP count for MFU, and one checkpoint format for every stage (atomic writes, loadable with
  this file alone, carrying the tokenizer the model was trained with).

Read it top to bottom: config, attention, block, model, sampling, FLOPs, checkpoints.
"""
import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    block_size: int = 256      # longest sequence (learned positions)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False         # biases in Linear and LayerNorm layers
    head: str = "lm"           # "lm": tied unembedding -> logits; "scalar": one number per position
    pool: str = "last"         # scalar head: r(x, y) from the output at the "last" token or the "mean" over y
    loglik: bool = False       # scalar head: add log p(x_t | x_<t) under the tied unembedding to output t


POOLS = ("last", "mean")       # the ways reward.score_sequences reduces a scalar head's outputs to r(x, y)


# ----------------------------------------------------------------------------- attention

class KVCache:
    """Keys and values of every layer for a batch of rows, preallocated to `max_len` positions.

    One (B, H, max_len, D) tensor per layer for keys and one for values, max_len = prompt + new
    tokens (no more): the positions filled so far, [:, :, :length], are one contiguous run per
    (row, head) that attention reads in place, never copied per step (reading the cache is what
    bounds a decode step on a CPU: 64 rows x 128 positions x 4 layers of fp32 keys and values are
    up to 32 MB a step).

    `valid[b, t]` is False where row b holds left-padding, so padded keys are never attended to
    (`padded` says whether any row has some); `next_pos[b]` is the position id (for the learned
    position embedding) of row b's next token; `length` the positions filled so far (all rows)."""

    def __init__(self, cfg, batch, max_len, device, dtype):
        shape = (batch, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.length, self.padded = 0, False

    @property
    def max_len(self):
        return self.valid.shape[1]

    def append(self, layer, k, v):
        """Store this step's keys and values (B, H, T, D) of `layer`; returns those to attend to."""
        start, T = self.length, k.shape[2]
        self.k[layer][:, :, start:start + T] = k
        self.v[layer][:, :, start:start + T] = v
        return self.k[layer][:, :, :start + T], self.v[layer][:, :, :start + T]

    def keep(self, rows):
        """Keep the rows a LongTensor lists, in its order (a copy): drops finished rows so later
        steps cost less, or repeats a row (a prompt shared by several samples, prefilled once)."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]
        self.valid, self.next_pos = self.valid[rows], self.next_pos[rows]
        self.padded = self.padded and not bool(self.valid[:, :self.length].all())


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.layer, self.n_head, self.dropout = layer, cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, attn_mask=None, cache=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:  # write this step's keys/values, attend to everything cached so far
            k, v = cache.append(self.layer, k, v)
        # attn_mask None means "plain causal, nothing padded": the fast (flash) path on CUDA
        causal = attn_mask is None and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def attention_mask(valid, T):
    """Boolean SDPA mask (B, 1, T, S) for the last T of S positions: causal, and padded keys hidden.

    `valid` (B, S) marks real tokens. A padded query would see no key at all (softmax over nothing
    is NaN), so every position may always attend to itself; padded outputs are never used."""
    S = valid.shape[1]
    q_pos = torch.arange(S - T, S, device=valid.device)[:, None]
    k_pos = torch.arange(S, device=valid.device)[None, :]
    causal = k_pos <= q_pos                                   # (T, S)
    mask = causal[None] & valid[:, None, :]                   # (B, T, S)
    mask = mask | (k_pos == q_pos)[None]
    return mask[:, None]


# ----------------------------------------------------------------------------- the transformer

class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, attn_mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), attn_mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.head in ("lm", "scalar"), cfg.head
        assert cfg.pool in POOLS, cfg.pool
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)]),
            ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
        ))
        if cfg.head == "lm":
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
            self.lm_head.weight = self.transformer.wte.weight  # tied unembedding
        else:
            self.score_head = nn.Linear(cfg.n_embd, 1, bias=True)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2L)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if cfg.head == "scalar":
            nn.init.normal_(self.score_head.weight, std=1 / math.sqrt(cfg.n_embd + 1))
            nn.init.zeros_(self.score_head.bias)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, valid=None, cache=None, logits_from=0, logits_at=None):
        """idx (B, T) token ids. Returns (out, loss):

        - lm head: logits (B, T, V), only for positions logits_from.. when given (-1: the last;
          the unembedding is the costliest matmul at this size), or (N, V) for the N positions
          where the bool mask `logits_at` (B, T) is True (sft.py: a demonstration's completion
          tokens); and the mean cross-entropy over targets != -1 when targets are given;
        - scalar head: values (B, T), loss None; with config.loglik, values[:, t] also adds
          log p(idx[:, t] | idx[:, :t]) from the tied unembedding for t > logits_from (none at
          t = 0), or only where `logits_at` is True, so a reward model can start from the LM's
          likelihood of a completion (reward.py).
        `valid` (B, T) marks real tokens when rows are left-padded (positions then start at each
        row's first real token); `cache` is a KVCache to read from and append to.

        Precision under bf16 autocast: where log-probs are read (logits without targets: sampling,
        PPO's log-probs; the loglik term) the unembedding and everything after it run in fp32, so
        the same input always gives the same fp32 log-probs (PPO's ratio is exactly 1 before an
        update); the trunk stays bf16. The training loss (targets given) keeps the bf16 logits, as
        nanoGPT does: only that path still differs in dtype between fp32 and bf16 runs."""
        B, T = idx.shape
        if cache is not None:
            start = cache.length
            if start + T > min(cache.max_len, self.config.block_size):
                raise ValueError(f"sequence of {start + T} tokens: longer than the KV cache ({cache.max_len}) "
                                 f"or block_size ({self.config.block_size})")
            if valid is None and T == 1:  # a decode step: one new real token per row
                pos = cache.next_pos[:, None]
                cache.valid[:, start] = True
                attn_mask = cache.valid[:, None, None, :start + 1] if cache.padded else None
            else:
                cache.valid[:, start:start + T] = True if valid is None else valid
                step_valid = cache.valid[:, start:start + T].long()
                pos = cache.next_pos[:, None] + step_valid.cumsum(1) - step_valid
                cache.padded = cache.padded or (valid is not None and not bool(valid.all()))
                causal_only = start == 0 and not cache.padded
                attn_mask = None if causal_only else attention_mask(cache.valid[:, :start + T], T)
        else:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens: longer than block_size ({self.config.block_size})")
            if valid is None:
                pos, attn_mask = torch.arange(T, device=idx.device)[None], None
            else:
                pos = (valid.long().cumsum(1) - 1).clamp(min=0)
                attn_mask = attention_mask(valid, T)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x, attn_mask, cache)
        if cache is not None:  # (a decode step's pos is a view of next_pos: advance only now)
            cache.next_pos += T if valid is None else valid.sum(1)
            cache.length += T
        x = self.transformer.ln_f(x)
        if self.config.head == "scalar":
            values = self.score_head(x).squeeze(-1)
            if self.config.loglik:
                # with a cache, the term is read within this chunk only: logits_at, never its column 0
                assert (cache is None or logits_at is not None) and logits_from >= 0, "loglik needs the whole sequence"
                if logits_at is None:
                    logits = self.unembed_fp32(x[:, logits_from:-1])
                    logp = F.log_softmax(logits, -1).gather(2, idx[:, logits_from + 1:, None]).squeeze(2)
                    values = values.float() + F.pad(logp, (logits_from + 1, 0))
                else:  # the term only at the positions logits_at marks (never t = 0): logits at t - 1
                    logits = self.unembed_fp32(x[F.pad(logits_at[:, 1:], (0, 1))])
                    logp = F.log_softmax(logits, -1).gather(1, idx[logits_at][:, None]).squeeze(1)
                    values = values.float().index_put((logits_at,), logp, accumulate=True)
            return values, None
        if targets is None:
            return self.unembed_fp32(x[:, logits_from:] if logits_at is None else x[logits_at]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1)
        return logits, loss

    def unembed_fp32(self, x):
        """Logits in fp32 from hidden states x, with autocast off: bf16 logits would round the
        log-probs PPO and the loglik RM read to ~3 significant digits."""
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.transformer.wte.weight.float())


# ----------------------------------------------------------------------------- sampling

@dataclass
class Generation:
    tokens: list      # per row: the sampled token ids (including the token that completed a stop)
    logprobs: list    # per row: log-prob of each sampled token under softmax(logits / temperature)
    texts: list       # per row: the decoded completion, cut before the first stop string
    finish: list      # per row: "stop" (a stop string), "eot" (end of text) or "length"


def pad_left(seqs, pad_id, device="cpu"):
    """Left-pad token lists into (B, T) ids so that every row ends at the last column; returns (idx,
    valid), valid marking the real tokens (the model then starts each row's positions at 0)."""
    T = max(map(len, seqs))
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    valid = torch.zeros(len(seqs), T, dtype=torch.bool)
    for b, s in enumerate(seqs):
        idx[b, T - len(s):] = torch.tensor(s, dtype=torch.long)
        valid[b, T - len(s):] = True
    return idx.to(device), valid.to(device)


def cache_dtype(model):
    """The dtype of a KV cache for `model`: under autocast its keys and values come out in the
    autocast dtype, else in the weights' dtype."""
    device = next(model.parameters()).device
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


def sample_token(logits, temperature=1.0, top_k=None, top_p=None, uniform=None):
    """One token per row of logits (B, V) and its log-prob under softmax(logits / temperature),
    before truncation (greedy, temperature 0: the argmax, its log-prob at temperature 1).

    top-k keeps the k most likely tokens; top-p (nucleus, Holtzman et al. 2019) the shortest run of
    most likely tokens whose probability reaches top_p. The token is where the running sum of the
    kept probabilities, sorted, first exceeds uniform[:, 0] times their total: `uniform` (B, 2),
    float64 in [0, 1), as engine.sample_next draws them (it uses the second column too)."""
    logits = logits.float()
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, F.log_softmax(logits, -1).gather(1, tok[:, None]).squeeze(1)
    w = ((logits - logits.amax(-1, keepdim=True)) / temperature).exp()  # unnormalised probabilities
    total = w.sum(-1, keepdim=True, dtype=torch.float64)
    w_sorted, order = w.sort(-1, descending=True)
    cum = w_sorted.cumsum(-1, dtype=torch.float64)
    keep = torch.ones_like(cum, dtype=torch.bool)
    if top_k is not None:
        keep[:, top_k:] = False
    if top_p is not None:  # a token is kept while the ones before it hold less than top_p
        keep &= F.pad(cum[:, :-1], (1, 0)) < top_p * total
    keep[:, 0] = True
    kept = cum.gather(1, keep.sum(-1, keepdim=True) - 1)  # the kept tokens' total
    tok = order.gather(1, torch.searchsorted(cum, uniform[:, :1] * kept, right=True)).squeeze(1)
    return tok, F.log_softmax(logits / temperature, -1).gather(1, tok[:, None]).squeeze(1)


@torch.no_grad()
def generate(model, prompts, max_new_tokens, enc=None, temperature=1.0, top_k=None, top_p=None,
             stop=(), eot_id=None, pad_id=0, generator=None, banned=()):
    """Sample a completion for every prompt (lists of token ids), batched, with a KV cache.

    Rows are left-padded to a common length and stay in the batch until every row is done. A row
    ends at the token after which one of the `stop` strings occurs in its bytes (needs `enc`), at
    `eot_id`, or after max_new_tokens. `banned` ids (padding) are never sampled. Each step draws
    uniform numbers (B, 2) from `generator`. engine.generate is the fast version the stages use."""
    device = next(model.parameters()).device
    B, P = len(prompts), max(map(len, prompts))
    if P + max_new_tokens > model.config.block_size:
        raise ValueError(f"prompt {P} + {max_new_tokens} new tokens > block_size {model.config.block_size}")
    idx, valid = pad_left(prompts, pad_id, device)
    cache = KVCache(model.config, B, P + max_new_tokens, device, cache_dtype(model))
    logits, _ = model(idx, valid=valid, cache=cache, logits_from=-1)
    stops = [s.encode() for s in stop if s]
    tokens, logprobs, text, finish = [[] for _ in prompts], [[] for _ in prompts], [b""] * B, [None] * B
    for _ in range(max_new_tokens):
        logits = logits[:, -1].index_fill(1, torch.tensor(banned, dtype=torch.long, device=device), -math.inf)
        uniform = torch.rand(B, 2, dtype=torch.float64, device=device, generator=generator) if temperature else None
        tok, logp = sample_token(logits, temperature, top_k, top_p, uniform)
        for b, (t, lp) in enumerate(zip(tok.tolist(), logp.tolist())):
            if finish[b] is None:
                tokens[b].append(t)
                logprobs[b].append(lp)
                if t == eot_id:
                    finish[b] = "eot"
                elif stops:
                    text[b] += enc.decode_single_token_bytes(t)
                    finish[b] = "stop" if any(s in text[b] for s in stops) else None
        if all(finish):
            break
        logits, _ = model(tok[:, None], cache=cache)
    texts = []
    for toks in tokens:
        t = enc.decode([x for x in toks if x != eot_id]) if enc is not None else ""
        texts.append(t[:min((t.find(s) for s in stop if s in t), default=len(t))])
    return Generation(tokens, logprobs, texts, [f or "length" for f in finish])


# ----------------------------------------------------------------------------- FLOPs and MFU

def flops_per_token(cfg, seq_len, n_params):
    """Training FLOPs per token (forward + backward): 6 N for the weights plus 12 L T C for the
    attention scores and values (PaLM appendix B; N excludes the position embedding)."""
    return 6 * n_params + 12 * cfg.n_layer * seq_len * cfg.n_embd


# dense bf16 FLOP/s per GPU (NVIDIA datasheets), by a part of torch.cuda.get_device_name: the first
# match wins, so the H100 PCIe and NVL cards come before the SXM part ("NVIDIA H100 80GB HBM3")
PEAK_FLOPS = (("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12),
              ("A100", 312e12))


def peak_flops(device):
    """Peak dense bf16 FLOP/s of the GPU, or None when unknown (CPUs: MFU is not reported)."""
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((v for k, v in PEAK_FLOPS if k.lower() in name), None)


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, model, *, tokenizer, stage, step, config=None, optimizer=None, extra=None):
    """One format for every stage. Atomic: written to a temporary file in the same directory, then
    renamed over `path`, so an interrupted save never leaves a corrupt checkpoint.

    tokenizer: the JSON-able state from tokenizer.to_state(enc); config: the stage's run config."""
    model = getattr(model, "_orig_mod", model)   # torch.compile wrapper
    model = getattr(model, "module", model)      # DDP wrapper
    ckpt = {"model_config": dataclasses.asdict(model.config), "head": model.config.head,
            "model": model.state_dict(), "tokenizer": tokenizer, "stage": stage, "step": step,
            "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config}
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    if extra:
        ckpt.update(extra)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    os.close(fd)
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, device="cpu", head=None):
    """Load a checkpoint written by save_checkpoint. Returns (model, ckpt).

    head="scalar" on a language-model checkpoint builds the reward model's starting point: the same
    trunk with the unembedding replaced by a freshly initialised scalar head."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise ValueError(f"{path} is not a flywheel checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "model_config" not in ckpt:
        raise ValueError(f"{path} is not a flywheel checkpoint")
    cfg = GPTConfig(**ckpt["model_config"])
    state = ckpt["model"]
    if head is not None and head != cfg.head:
        cfg = dataclasses.replace(cfg, head=head)
        drop = ("lm_head.", "score_head.")
        state = {k: v for k, v in state.items() if not k.startswith(drop)}
    model = GPT(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight", "score_head.weight", "score_head.bias"}  # tied / re-initialised
    if unexpected or set(missing) - allowed:
        raise ValueError(f"{path}: weights do not match the config (missing {missing}, unexpected {unexpected})")
    return model.to(device), ckpt
