"""The GPT shared by every stage: a pre-LN decoder-only transformer (GPT-2 style) with

- attention through F.scaled_dot_product_attention (causal; a boolean mask when rows are left-padded),
- a KV cache and a batched sampler (temperature, top-k, top-p, stop strings / end-of-text, per-row
  early stop) that returns the sampled tokens and their log-probs,
- a tied unembedding, or a scalar head in its place for the reward and value models,
- a FLOP count for MFU, and one checkpoint format for every stage (atomic writes, loadable with
  this file alone, carrying the tokenizer the model was trained with).

Read it top to bottom: config, attention, block, model, sampler, FLOPs, checkpoints.
"""
import dataclasses
import math
import os
import tempfile
import weakref
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


POOLS = ("last", "mean")       # the ways score_sequences reduces a scalar head's outputs to r(x, y)


# ----------------------------------------------------------------------------- attention

class KVCache:
    """Keys and values of every layer for a batch of rows, preallocated to `max_len` positions.

    One (B, H, max_len, D) tensor per layer for keys and one for values, max_len = prompt + new
    tokens (no more): the positions filled so far, [:, :, :length], are one contiguous run per
    (row, head) that attention reads in place. Reading the cache is what bounds a decode step on a
    CPU (64 rows x 128 positions x 4 layers of fp32 keys and values: up to 32 MB a step), so it is
    never copied per step (HF's DynamicCache concatenates, i.e. copies, every layer every step).

    `valid[b, t]` is False where row b holds left-padding, so padded keys are never attended to
    (`padded` says whether any row has some); `next_pos[b]` is the position id (for the learned
    position embedding) of row b's next token; `length` the positions filled so far (all rows).

    static=True (generate(compile=True)): a one-token decode step writes at `index`, a tensor, and
    attends to all max_len positions with the unfilled ones masked, so every step has the same
    shapes and reads no Python number that changes: torch.compile captures it once (with CUDA
    graphs under mode="reduce-overhead", gpt-fast style). Its tensors are marked as static
    addresses so the captured graph can keep updating them in place."""

    def __init__(self, cfg, batch, max_len, device, dtype, static=False):
        shape = (batch, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
        # eagerly only positions already written are read; a static step reads (masked) all of them
        new = torch.zeros if static else torch.empty
        self.k = [new(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [new(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.length, self.padded, self.static = 0, False, static
        self.index = torch.zeros(1, dtype=torch.long, device=device)  # = length, for static steps
        if static:
            for t in (*self.k, *self.v, self.valid, self.next_pos, self.index):
                torch._dynamo.mark_static_address(t)

    @property
    def max_len(self):
        return self.valid.shape[1]

    def reset(self):
        """Empty the cache for a new batch of the same size (a static cache is reused: same addresses)."""
        self.valid.zero_(), self.next_pos.zero_(), self.index.zero_()
        self.length, self.padded = 0, False

    def append(self, layer, k, v, step):
        """Store this step's keys and values (B, H, T, D) of `layer`; returns those to attend to.
        `step` is True for a static one-token decode step."""
        if step:
            self.k[layer].index_copy_(2, self.index, k)
            self.v[layer].index_copy_(2, self.index, v)
            return self.k[layer], self.v[layer]
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

    def forward(self, x, attn_mask=None, cache=None, step=False):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:  # write this step's keys/values, attend to everything cached so far
            k, v = cache.append(self.layer, k, v, step)
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

    def forward(self, x, attn_mask=None, cache=None, step=False):
        x = x + self.attn(self.ln_1(x), attn_mask, cache, step)
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
        step = cache is not None and cache.static and T == 1 and valid is None
        if step:  # a static decode step: fixed shapes, nothing read back to the host (generate checks lengths)
            pos = cache.next_pos[:, None]
            cache.valid.index_fill_(1, cache.index, True)
            attn_mask = cache.valid[:, None, None, :]
        elif cache is not None:
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
            x = block(x, attn_mask, cache, step)
        if step:  # (pos is a view of next_pos: advance only now)
            cache.next_pos += 1
            cache.index += 1
        elif cache is not None:
            cache.next_pos += T if valid is None else valid.sum(1)
            cache.length += T
            if cache.static:
                cache.index.fill_(cache.length)
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


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None, uniform=None,
                static=False):
    """Pick one token per row from logits (B, V). Returns (tokens (B,), logprobs (B,)) where the
    log-prob is under softmax(logits / temperature), before any top-k / top-p truncation (the
    distribution PPO's log-probs are computed under). temperature 0 means greedy (log-prob of the
    argmax at temperature 1).

    Sampling inverts the cumulative distribution with two uniform numbers per row (`uniform`
    (B, 2) float64 in [0, 1), else drawn from `generator`); see `inverse_cdf`. Drawing a random
    number per vocabulary entry instead (exponential race / Gumbel-max, torch.multinomial) cost a
    third of a decode step on a CPU.

    top-k keeps the k most likely tokens; top-p (nucleus, Holtzman et al. 2019) the smallest set of
    most likely tokens whose probability reaches top_p (at least the most likely one). Both keep a
    prefix of the tokens sorted by probability, sampled in proportion to their probabilities.
    Sorting is the slow part on a CPU (topk over 256 x 4096: 7 ms for 128 candidates, 38 ms for
    all), so top-p alone first tries `sure_nucleus`, which needs no sort; the rows it does not
    settle sort 128 candidates, then 1024, then all (`sorted_pick`), each wider try only for the
    rows whose nucleus the narrower one did not hold. `static` always sorts everything (no decision
    on the host, for a captured CUDA graph)."""
    logits = logits.float()
    if temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, F.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1)
    B, V = logits.shape
    if uniform is None:
        uniform = torch.rand(B, 2, dtype=torch.float64, device=logits.device, generator=generator)
    top = logits.amax(-1, keepdim=True)
    w = logits - top
    if temperature != 1:
        w /= temperature
    w.exp_()                                   # unnormalised probabilities, the largest one 1
    limit = V if top_k is None else min(top_k, V)
    nucleus = top_p if top_p is not None and top_p < 1.0 else None
    if limit == V and nucleus is None:
        tokens, total = inverse_cdf(w, uniform)
    elif static:
        total = w.sum(-1, keepdim=True, dtype=torch.float64)
        tokens, _ = sorted_pick(w, total, uniform, nucleus, limit, limit)
    else:
        total = w.sum(-1, keepdim=True, dtype=torch.float64)
        if limit == V:  # top-p alone: the rows sure_nucleus settles need no sort
            sure, settled = sure_nucleus(w, total, nucleus)  # (the other rows draw from all of w here, then again below)
            tokens, _ = inverse_cdf(torch.where(sure | ~settled[:, None], w, 0.0), uniform)
            wide, k = ~settled, min(limit, 128)
        else:  # top-k (a nucleus inside it with top-p): every row's first k candidates
            k = limit if nucleus is None else min(limit, 128)
            tokens, wide = sorted_pick(w, total, uniform, nucleus, limit, k)
            k = min(8 * k, limit)
        rows = wide.nonzero().squeeze(1)
        while len(rows):  # sort k candidates of the rows still undecided; 8 k for those wider still
            tokens[rows], wide = sorted_pick(w[rows], total[rows], uniform[rows], nucleus, limit, k)
            rows, k = rows[wide], min(8 * k, limit)
    logp = (logits.gather(1, tokens) - top) / temperature - total.log().float()
    return tokens.squeeze(1), logp.squeeze(1)


def sure_nucleus(w, total, top_p):
    """The top-p nucleus of each row of unnormalised probabilities w (B, V) without sorting, where
    one comparison finds it. Every token heavier than (1 - top_p) * total is in the nucleus (the
    mass of the tokens heavier than it is below top_p * total); when those tokens reach top_p *
    total between them, they are the whole nucleus, since it is the shortest prefix of the sorted
    tokens that does. That is most rows of a fine-tuned model's distribution (a handful of
    plausible tokens), few of a flat one. Returns (sure (B, V) bool, settled (B,) bool: rows whose
    nucleus is `sure`)."""
    bound = (1 - top_p) * total                      # float64
    cut = bound.float()
    cut = torch.where(cut.double() < bound, torch.nextafter(cut, torch.full_like(cut, math.inf)), cut)
    sure = w > cut                                   # w > cut >= (1 - top_p) * total, exactly
    mass = torch.where(sure, w, 0.0).sum(-1, keepdim=True, dtype=torch.float64)
    return sure, ((mass >= top_p * total) & (mass > 0)).squeeze(1)


def sorted_pick(w, total, uniform, top_p, limit, k):
    """One draw per row from the `limit` most likely tokens of w (B, V) (then the top-p nucleus
    among them when top_p is set), from its k most likely tokens, sorted, with their running sums.
    Returns (tokens (B, 1), wide (B,) bool: rows whose nucleus may reach beyond those k, k <
    limit: their token is not valid, sort more for them)."""
    cand_w, cand = w.topk(k, -1)
    cum = cand_w.cumsum(-1, dtype=torch.float64)
    kept = cum[:, -1:]
    if top_p is not None:  # keep a candidate while the ones before it have not reached top_p
        before = F.pad(cum[:, :-1], (1, 0))
        n_kept = (before < top_p * total).sum(-1, keepdim=True).clamp(min=1)
        kept = cum.gather(1, n_kept - 1)
    pick = torch.searchsorted(cum, uniform[:, :1] * kept, right=True)  # < n_kept: u * kept < kept
    wide = torch.zeros_like(cum[:, 0], dtype=torch.bool)
    if top_p is not None and k < limit:
        wide = cum[:, -1] < top_p * total[:, 0]
    return cand.gather(1, pick), wide


def inverse_cdf(w, uniform, block=64):
    """One draw per row from the unnormalised probabilities w (B, n) >= 0, given uniform (B, 2)
    float64 in [0, 1). Returns (index (B, 1), total (B, 1) = w.sum(-1) in float64).

    Running sums in float64 so that each entry's share of the total is its fp32 weight, with no
    rounding of the distribution. In two levels, as a float64 cumsum over the whole vocabulary
    costs a few times more on a CPU (at 64 x 4096: 0.5 vs 0.2 ms; 4 vs 0.4 ms without run.sh's
    malloc settings): the sums of blocks of 64 entries pick a block with probability (block sum /
    total), uniform[:, 0]; the running sums inside that block pick the entry with probability
    (weight / block sum), uniform[:, 1]. searchsorted(c, u * c[-1], right=True) is the first entry
    whose running sum exceeds u * c[-1]; since u * c[-1] < c[-1] (u <= 1 - 2**-53), that entry
    exists and has a positive weight: a zero-probability entry is never picked."""
    B, n = w.shape
    if n <= block:
        c = w.cumsum(-1, dtype=torch.float64)
        return torch.searchsorted(c, uniform[:, :1] * c[:, -1:], right=True), c[:, -1:]
    blocks = (F.pad(w, (0, -n % block)) if n % block else w).view(B, -1, block)  # zero weights pad
    c = blocks.sum(-1, dtype=torch.float64).cumsum(-1)
    j = torch.searchsorted(c, uniform[:, :1] * c[:, -1:], right=True)
    inner = blocks.gather(1, j[:, :, None].expand(B, 1, block)).squeeze(1).cumsum(-1, dtype=torch.float64)
    i = torch.searchsorted(inner, uniform[:, 1:] * inner[:, -1:], right=True)
    return j * block + i, c[:, -1:]


class StopStrings:
    """The stop strings as a finite automaton over token ids: which rows just completed a stop
    string is then one table lookup per step for the whole batch, with no text decoded per row.

    A row's state is the longest suffix of its text (bytes) that is a proper prefix of some stop
    string (state 0: none), or STOPPED once a stop string has occurred. A stop string that ends in
    the next byte began inside that suffix, so the suffix is all of the past that matters: the
    Knuth-Morris-Pratt / Aho-Corasick automaton. `table[state, token]` runs the token's bytes
    through it; it is built once per (tokenizer, stop strings, vocabulary size, device), all
    tokens at once, one byte position at a time."""

    _built = {}

    def __init__(self, table):
        self.table, self.STOPPED = table, table.shape[0] - 1

    @classmethod
    def build(cls, enc, stop, vocab_size, device):
        key = (id(enc), tuple(stop), vocab_size, str(device))
        if key in cls._built and cls._built[key][0] is enc:
            return cls._built[key][1]
        stops = [s.encode() for s in stop if s]
        states = sorted({s[:i] for s in stops for i in range(len(s))}, key=lambda p: (len(p), p))
        state_of = {p: i for i, p in enumerate(states)}
        STOPPED = len(states)

        def after(text):  # the state of a text whose every shorter prefix was not stopped
            if any(text.endswith(s) for s in stops):
                return STOPPED
            return next(state_of[text[i:]] for i in range(len(text) + 1) if text[i:] in state_of)

        # one byte: next_state[state, byte]; byte 256 pads token byte strings and changes nothing
        next_state = torch.tensor([[after(p + bytes([c])) for c in range(256)] + [i] for i, p in enumerate(states)]
                                  + [[STOPPED] * 257])
        token_bytes = []
        for t in range(vocab_size):
            try:
                token_bytes.append(list(enc.decode_single_token_bytes(t)))
            except (KeyError, ValueError):  # an id the tokenizer does not have: never sampled
                token_bytes.append([])
        width = max(map(len, token_bytes))
        token_bytes = torch.tensor([b + [256] * (width - len(b)) for b in token_bytes])  # (V, width)
        table = torch.arange(STOPPED + 1)[:, None].expand(-1, vocab_size)
        for i in range(width):
            table = next_state[table, token_bytes[:, i]]
        out = cls(table.to(device))
        cls._built[key] = (enc, out)
        return out


FINISH = ("length", "stop", "eot")  # Generation.finish, by code


@torch.no_grad()
def generate(model, prompts, max_new_tokens, enc=None, temperature=1.0, top_k=None, top_p=None,
             stop=(), eot_id=None, pad_id=0, generator=None, use_cache=True, banned=(), compile=False):
    """Sample a completion for every prompt (lists of token ids), batched.

    Rows are left-padded to a common length. Each row stops at its first stop string (needs
    `enc`: checked on the tokens' bytes by StopStrings), at `eot_id`, or after max_new_tokens.
    `banned` token ids (padding) are never sampled. `use_cache=False` recomputes the whole
    sequence every step: the naive reference the KV-cache path is tested against.

    The loop keeps everything per row in tensors (sampled tokens, log-probs, stop state, when and
    why a row finished): no Python work per row and step. Eagerly, finished rows leave the batch
    (and the KV cache) once a quarter of it has finished, so the rest run faster. A prompt that
    several rows share (n samples per problem) is prefilled once and its KV cache copied to them.

    compile=True: the decode step (forward + sampling) runs under torch.compile(mode=
    "reduce-overhead"), gpt-fast style, on a static KV cache (KVCache(static=True), the whole
    block_size, kept per model and batch size so its addresses stay fixed between calls): fixed
    shapes, so on CUDA one CUDA graph replays every step. Finished rows stay in the batch; the
    host checks whether all rows are done every 8 steps (every step on a CPU). The prompt is
    still run eagerly. Meant for CUDA; on a CPU it gives the same tokens, not more speed."""
    device = next(model.parameters()).device
    cfg = model.config
    B, N = len(prompts), max_new_tokens
    P = max(len(p) for p in prompts)
    if P + N > cfg.block_size:
        raise ValueError(f"prompt {P} + {N} new tokens > block_size {cfg.block_size}")
    if stop and enc is None:
        raise ValueError("stop strings need the tokenizer (enc)")
    # a prompt repeated (n samples per problem, K completions per prompt) is run through the model
    # once: the prefill covers the distinct prompts, then their KV cache rows are copied out to every
    # row that repeats them (row_of[b]: the distinct prompt of row b)
    distinct, row_of = distinct_rows(prompts)
    shared = use_cache and not compile and len(distinct) < B
    firsts = distinct if shared else prompts
    idx, valid = pad_left(firsts, pad_id, device)
    padded = not bool(valid.all())
    ban = torch.tensor(sorted(banned), dtype=torch.long, device=device)
    stops = StopStrings.build(enc, stop, cfg.vocab_size, device) if stop else None
    sample = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)

    cache, decode = None, _decode_step
    if use_cache:
        dtype = cache_dtype(model)
        if compile:
            cache, decode = _static_cache(model, B, dtype), _compiled_decode_step()
        else:
            cache = KVCache(cfg, len(firsts), P + N, device, dtype)

    # everything per original row b; `rows` lists the rows still in the batch, in batch order
    tokens = torch.zeros(B, N, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, N, device=device)
    end = torch.full((B,), N, dtype=torch.long, device=device)     # tokens kept per row
    why = torch.zeros(B, dtype=torch.long, device=device)          # index into FINISH
    done = torch.zeros(B, dtype=torch.bool, device=device)
    state = torch.zeros(B, dtype=torch.long, device=device)        # StopStrings state
    rows = torch.arange(B, device=device)
    check_every = 1 if device.type == "cpu" else 8

    logits, _ = model(idx, valid=valid if padded else None, cache=cache, logits_from=-1)
    if shared:
        row_of = torch.tensor(row_of, device=device)
        cache.keep(row_of)  # (a copy per row, once)
        logits = logits[row_of]
    tok, logp = _sample(logits[:, -1], ban, sample)
    for step in range(N):
        tokens[rows, step], logprobs[rows, step] = tok, logp
        live = ~done[rows]
        finished = torch.zeros_like(live) if eot_id is None else tok == eot_id
        why[rows] = torch.where(live & finished, FINISH.index("eot"), why[rows])
        if stops is not None:
            state[rows] = s = stops.table[state[rows], tok]
            stopped = live & ~finished & (s == stops.STOPPED)
            why[rows] = torch.where(stopped, FINISH.index("stop"), why[rows])
            finished = finished | stopped
        end[rows] = torch.where(live & finished, step + 1, end[rows])
        done[rows] = ~live | finished
        if step == N - 1:
            break
        if step % check_every == check_every - 1 or not compile:
            n_live = int((~done[rows]).sum())
            if n_live == 0:
                break
            if not compile and n_live <= 0.75 * len(rows):  # drop finished rows (a copy: only now and then)
                keep = (~done[rows]).nonzero().squeeze(1)
                rows, tok = rows[keep], tok[keep]
                if cache is not None:
                    cache.keep(keep)
                else:
                    idx, valid = idx[keep], valid[keep]
        if cache is None:
            idx = torch.cat([idx, tok[:, None]], 1)
            valid = torch.cat([valid, torch.ones_like(tok[:, None], dtype=torch.bool)], 1)
            logits, _ = model(idx, valid=valid if padded else None, logits_from=-1)
            tok, logp = _sample(logits[:, -1], ban, sample)
            continue
        u = None if temperature == 0 else torch.rand(len(rows), 2, dtype=torch.float64, device=device,
                                                      generator=generator)
        if compile:
            torch.compiler.cudagraph_mark_step_begin()
            tok, logp = (t.clone() for t in decode(model, tok, cache, u, ban, temperature, top_k, top_p))
            cache.length += 1
        else:
            tok, logp = decode(model, tok, cache, u, ban, temperature, top_k, top_p)

    end, why = end.tolist(), why.tolist()
    out_tokens = [t[:n] for t, n in zip(tokens.tolist(), end)]
    out_logprobs = [lp[:n] for lp, n in zip(logprobs.tolist(), end)]
    texts = []
    for toks in out_tokens:
        text = enc.decode([t for t in toks if t != eot_id]) if enc is not None else ""
        cut = min((text.find(s) for s in stop if s in text), default=len(text))
        texts.append(text[:cut])
    return Generation(out_tokens, out_logprobs, texts, [FINISH[w] for w in why])


def _sample(logits, ban, sample, uniform=None, static=False):
    """sample_next on the last position's logits (B, V), banned ids excluded."""
    if len(ban):
        logits = logits.index_fill_(1, ban, float("-inf"))  # in place: a fresh tensor
    return sample_next(logits, uniform=uniform, static=static, **sample)


def _decode_step(model, tok, cache, uniform, ban, temperature, top_k, top_p):
    """One decode step: the new tokens (B,) through the model with the KV cache, then the next
    tokens and their log-probs. Eager, or compiled whole on a static cache."""
    logits, _ = model(tok[:, None], cache=cache)
    sample = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    return _sample(logits[:, -1], ban, sample, uniform, static=cache.static)


_compiled = None
_static_caches = weakref.WeakKeyDictionary()  # model -> {(batch, dtype, device): KVCache(static=True)}


def _compiled_decode_step():
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_decode_step, mode="reduce-overhead", fullgraph=True)
    return _compiled


def _static_cache(model, batch, dtype):
    """The model's static KV cache for this batch size (the whole block_size), emptied: reusing it
    keeps the addresses a captured CUDA graph writes to."""
    device = next(model.parameters()).device
    caches = _static_caches.setdefault(model, {})
    key = (batch, dtype, str(device))
    if key not in caches:
        caches[key] = KVCache(model.config, batch, model.config.block_size, device, dtype, static=True)
    caches[key].reset()
    return caches[key]


STOP = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")  # Codex §2.3: a completion ends at these


def sample_completions(model, enc, prompts, max_new_tokens, temperature=0.0, top_p=None, batch_size=64,
                       generator=None, desc=None):
    """Sample one completion per prompt string with the KV-cache sampler, batched; returns, in the
    order of `prompts`, dicts {completion (cut at the Codex stop sequences), sum_logprob,
    mean_logprob, finish, tokens (as sampled, the stop string's and end of text included)}. Prompts are sorted by length so each batch pads little; an over-long
    prompt keeps its end; each batch gets as many new tokens as fit (at most max_new_tokens)."""
    import tokenizer as tok  # text-level helper: the floor's tokenizer, imported where used
    from tqdm import tqdm
    eot_id, pad_id = tok.special_ids(enc)
    block = model.config.block_size
    toks = [enc.encode_ordinary(p)[-(block - 1):] for p in prompts]
    order = sorted(range(len(toks)), key=lambda i: len(toks[i]))
    out = [None] * len(toks)
    was_training = model.training
    model.eval()
    for s in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None, leave=False):
        rows = order[s:s + batch_size]
        new = min(max_new_tokens, block - max(len(toks[i]) for i in rows))
        gen = generate(model, [toks[i] for i in rows], new, enc=enc, temperature=temperature, top_p=top_p,
                       stop=STOP, eot_id=eot_id, pad_id=pad_id, generator=generator, banned=(pad_id,))
        for j, i in enumerate(rows):
            lp = gen.logprobs[j]
            out[i] = {"completion": gen.texts[j], "sum_logprob": float(sum(lp)),
                      "mean_logprob": float(sum(lp) / max(1, len(lp))), "finish": gen.finish[j],
                      "tokens": gen.tokens[j]}
    model.train(was_training)
    return out


def distinct_rows(seqs):
    """(distinct, row_of): the distinct token lists among seqs, in order of first appearance, and
    for each seqs[i] the index of its copy in `distinct`."""
    index = {}
    row_of = [index.setdefault(tuple(s), len(index)) for s in seqs]
    return [list(s) for s in index], row_of


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


def pad_right(seqs, pad_id, device="cpu"):
    """Right-pad token lists into (B, T) ids; returns (idx, lengths). With a causal model, padding
    after a row's end never changes that row's outputs, so no attention mask is needed."""
    lengths = torch.tensor([len(s) for s in seqs], device=device)
    idx = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long, device=device)
    for b, s in enumerate(seqs):
        idx[b, :len(s)] = torch.tensor(s, dtype=torch.long)
    return idx, lengths


def score_sequences(model, seqs, pad_id, starts=None, per_token=False):
    """The reward model's score r(x, y) of each seqs[i] = prompt + completion + [end of text]
    (DESIGN.md), from the scalar head's per-token outputs as model.config.pool says:
    - "last": the output at the last token (InstructGPT §3.5);
    - "mean": the mean of the outputs over the completion and the end of text, positions
      starts[i] .. len(seqs[i]) - 1 (starts[i] = the number of prompt tokens).
    Rows that share a prompt (reward.py's K completions of one prompt, n samples of a problem) run
    that prompt through the model once (`_score_shared_prompts`). Differentiable; wrap in no_grad
    to score. per_token=True (mean pool) also returns the pooled outputs of each row, a list of 1-D
    tensors whose means are the scores: r(x, y) split over its tokens (PPO's token-level reward)."""
    mean = model.config.pool == "mean"
    if mean and starts is None:
        raise ValueError("pool='mean' needs starts: where each completion begins")
    if per_token and not mean:
        raise ValueError("per_token needs pool='mean'")
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
    scores = (values * on).sum(1) / on.sum(1)
    return (scores, [v[o] for v, o in zip(values, on)]) if per_token else scores


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
    ckpt = {
        "model_config": dataclasses.asdict(model.config),
        "head": model.config.head,
        "model": model.state_dict(),
        "tokenizer": tokenizer,
        "stage": stage,
        "step": step,
        "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config,
    }
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
