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

    `valid[b, t]` is False where row b holds left-padding, so padded keys are never attended to;
    `next_pos[b]` is the position id (for the learned position embedding) of row b's next token."""

    def __init__(self, cfg, batch, max_len, device, dtype):
        shape = (cfg.n_layer, batch, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0  # positions filled so far (the same for every row)

    def keep(self, rows):
        """Drop finished rows (a LongTensor of rows to keep) so later steps cost less."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]
        self.valid, self.next_pos = self.valid[rows], self.next_pos[rows]


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
            start = cache.length
            cache.k[self.layer, :, :, start:start + T] = k
            cache.v[self.layer, :, :, start:start + T] = v
            k = cache.k[self.layer, :, :, :start + T]
            v = cache.v[self.layer, :, :, :start + T]
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

    def forward(self, idx, targets=None, valid=None, cache=None, logits_from=0):
        """idx (B, T) token ids. Returns (out, loss):

        - lm head: logits (B, T, V), only for positions logits_from.. when given (-1: the last;
          the unembedding is the costliest matmul at this size), and the mean cross-entropy over
          targets != -1 when targets are given;
        - scalar head: values (B, T), loss None; with config.loglik, values[:, t] also adds
          log p(idx[:, t] | idx[:, :t]) from the tied unembedding for t > logits_from (none at
          t = 0), so a reward model can start from the LM's likelihood of a completion (reward.py).
        `valid` (B, T) marks real tokens when rows are left-padded (positions then start at each
        row's first real token); `cache` is a KVCache to read from and append to."""
        B, T = idx.shape
        if cache is not None:
            start = cache.length
            assert start + T <= cache.k.shape[3], "KV cache is full"
            cache.valid[:, start:start + T] = True if valid is None else valid
            step_valid = cache.valid[:, start:start + T].long()
            pos = cache.next_pos[:, None] + step_valid.cumsum(1) - step_valid
            cache.next_pos += step_valid.sum(1)
            all_valid = cache.valid[:, :start + T]
            attn_mask = None if (start == 0 and valid is None) else attention_mask(all_valid, T)
            if T == 1 and bool(all_valid.all()):
                attn_mask = None  # one new query may attend to every cached key
        else:
            if valid is None:
                pos, attn_mask = torch.arange(T, device=idx.device)[None], None
            else:
                pos = (valid.long().cumsum(1) - 1).clamp(min=0)
                attn_mask = attention_mask(valid, T)
        assert int(pos.max()) < self.config.block_size, "sequence longer than block_size"
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x, attn_mask, cache)
        if cache is not None:
            cache.length += T
        x = self.transformer.ln_f(x)
        if self.config.head == "scalar":
            values = self.score_head(x).squeeze(-1)
            if self.config.loglik:
                assert cache is None and logits_from >= 0, "loglik needs the whole sequence"
                logits = F.linear(x[:, logits_from:-1].contiguous(), self.transformer.wte.weight).float()
                logp = F.log_softmax(logits, -1).gather(2, idx[:, logits_from + 1:, None]).squeeze(2)
                values = values.float() + F.pad(logp, (logits_from + 1, 0))
            return values, None
        if targets is None:
            return self.lm_head(x[:, logits_from:].contiguous()), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1)
        return logits, loss


# ----------------------------------------------------------------------------- sampling

@dataclass
class Generation:
    tokens: list      # per row: the sampled token ids (including the token that completed a stop)
    logprobs: list    # per row: log-prob of each sampled token under softmax(logits / temperature)
    texts: list       # per row: the decoded completion, cut before the first stop string
    finish: list      # per row: "stop" (a stop string), "eot" (end of text) or "length"


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick one token per row from logits (B, V). Returns (tokens (B,), logprobs (B,)) where the
    log-prob is under softmax(logits / temperature), before any top-k / top-p truncation (the
    distribution PPO's log-probs are computed under). temperature 0 means greedy (log-prob of the
    argmax at temperature 1).

    top-p (nucleus, Holtzman et al. 2019) keeps the smallest set of most likely tokens whose
    probability reaches top_p. Sorting the whole vocabulary every step is the slow part of CPU
    sampling, so the nucleus is first looked for among the 128 most likely tokens, and the full
    sort is done only for a step where some row's nucleus is wider than that."""
    logits = logits.float()
    if temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, F.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1)
    logp = F.log_softmax(logits / temperature, -1)
    V = logp.size(-1)
    limit = V if top_k is None else min(top_k, V)
    nucleus = top_p is not None and top_p < 1.0
    if limit < V or nucleus:
        cand_logp, cand = logp.topk(min(limit, 128) if nucleus else limit, -1)  # sorted, descending
        if nucleus and cand.size(-1) < limit and bool((cand_logp.exp().sum(-1) < top_p).any()):
            cand_logp, cand = logp.topk(limit, -1)
        probs = cand_logp.exp()
        if nucleus:  # drop a candidate once the ones before it already reach top_p
            probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
    else:
        cand, probs = None, logp.exp()
    # sample from probs as argmax(p / E) with E ~ Exponential(1) (the Gumbel-max trick in another
    # form): the same distribution as torch.multinomial, several times faster on CPU
    noise = torch.empty_like(probs).exponential_(generator=generator)
    pick = (probs / noise).argmax(-1)
    tokens = pick if cand is None else cand.gather(1, pick[:, None]).squeeze(1)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)


@torch.no_grad()
def generate(model, prompts, max_new_tokens, enc=None, temperature=1.0, top_k=None, top_p=None,
             stop=(), eot_id=None, pad_id=0, generator=None, use_cache=True, banned=()):
    """Sample a completion for every prompt (lists of token ids), batched.

    Rows are left-padded to a common length. Each row stops at its first stop string (decoded
    text, needs `enc`), at `eot_id`, or after max_new_tokens; finished rows leave the batch (and
    the KV cache) so the rest run faster. `use_cache=False` recomputes the whole sequence every
    step: the naive reference the KV-cache path is tested against. `banned` token ids (padding)
    are never sampled."""
    device = next(model.parameters()).device
    cfg = model.config
    B = len(prompts)
    P = max(len(p) for p in prompts)
    assert P + max_new_tokens <= cfg.block_size, f"prompt {P} + {max_new_tokens} new > {cfg.block_size}"
    idx = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(B, P, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        idx[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[b, P - len(p):] = True
    padded = not bool(valid.all())
    dtype = next(model.parameters()).dtype
    cache = KVCache(cfg, B, P + max_new_tokens, device, dtype) if use_cache else None
    ban = torch.tensor(list(banned), dtype=torch.long, device=device)

    rows = list(range(B))      # the original row of each batch entry
    live = [True] * B          # entries whose row has not finished yet
    out_tokens = [[] for _ in range(B)]
    out_logprobs = [[] for _ in range(B)]
    out_bytes = [b"" for _ in range(B)]
    finish = ["length"] * B
    texts = [None] * B
    longest_stop = max((len(s) for s in stop), default=0)

    logits, _ = model(idx, valid=valid if padded else None, cache=cache, logits_from=-1)
    for step in range(max_new_tokens):
        logits = logits[:, -1]
        if len(ban):
            logits = logits.index_fill(1, ban, float("-inf"))
        tok, logp = sample_next(logits, temperature, top_k, top_p, generator)
        tok_list, logp_list = tok.tolist(), logp.tolist()
        for i, b in enumerate(rows):
            if not live[i]:
                continue
            t = tok_list[i]
            out_tokens[b].append(t)
            out_logprobs[b].append(logp_list[i])
            if t == eot_id:
                finish[b], live[i] = "eot", False
            elif stop:
                out_bytes[b] += enc.decode_single_token_bytes(t)
                tail = out_bytes[b][-(longest_stop + 64):].decode("utf-8", errors="replace")
                if any(s in tail for s in stop):
                    finish[b], live[i] = "stop", False
        n_live = sum(live)
        if n_live == 0 or step == max_new_tokens - 1:
            break
        if n_live <= 0.75 * len(rows):  # drop finished entries (a copy, so only now and then)
            keep = [i for i in range(len(rows)) if live[i]]
            k = torch.tensor(keep, device=device)
            tok, idx, valid = tok[k], idx[k], valid[k]
            if cache is not None:
                cache.keep(k)
            rows, live = [rows[i] for i in keep], [True] * len(keep)
        if cache is not None:
            logits, _ = model(tok[:, None], cache=cache)
        else:
            idx = torch.cat([idx, tok[:, None]], 1)
            valid = torch.cat([valid, torch.ones_like(tok[:, None], dtype=torch.bool)], 1)
            logits, _ = model(idx, valid=valid if padded else None, logits_from=-1)

    for b in range(B):
        toks = [t for t in out_tokens[b] if t != eot_id]
        text = enc.decode(toks) if enc is not None else ""
        cut = min((text.find(s) for s in stop if s in text), default=len(text))
        texts[b] = text[:cut]
    return Generation(out_tokens, out_logprobs, texts, finish)


STOP = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")  # Codex §2.3: a completion ends at these


def sample_completions(model, enc, prompts, max_new_tokens, temperature=0.0, top_p=None, batch_size=64,
                       generator=None, desc=None):
    """Sample one completion per prompt string with the KV-cache sampler, batched; returns, in the
    order of `prompts`, dicts {completion (cut at the Codex stop sequences), sum_logprob,
    mean_logprob, finish}. Prompts are sorted by length so each batch pads little; an over-long
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
                      "mean_logprob": float(sum(lp) / max(1, len(lp))), "finish": gen.finish[j]}
    model.train(was_training)
    return out


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
    (DESIGN.md), from the scalar head's per-token outputs as model.config.pool says:
    - "last": the output at the last token (InstructGPT §3.5);
    - "mean": the mean of the outputs over the completion and the end of text, positions
      starts[i] .. len(seqs[i]) - 1 (starts[i] = the number of prompt tokens).
    Differentiable; wrap in no_grad to score."""
    mean = model.config.pool == "mean"
    if mean and starts is None:
        raise ValueError("pool='mean' needs starts: where each completion begins")
    idx, lengths = pad_right(seqs, pad_id, next(model.parameters()).device)
    first = max(0, int(min(starts)) - 1) if mean else 0   # loglik: logits from the completion on
    values, _ = model(idx, logits_from=first)
    values = values.float()
    if not mean:
        return values[torch.arange(len(seqs), device=idx.device), lengths - 1]
    starts = torch.as_tensor(starts, device=idx.device)
    pos = torch.arange(idx.shape[1], device=idx.device)[None]
    on = (pos >= starts[:, None]) & (pos < lengths[:, None])
    return (values * on).sum(1) / on.sum(1)


# ----------------------------------------------------------------------------- FLOPs and MFU

def flops_per_token(cfg, seq_len, n_params):
    """Training FLOPs per token (forward + backward): 6 N for the weights plus 12 L T C for the
    attention scores and values (PaLM appendix B; N excludes the position embedding)."""
    return 6 * n_params + 12 * cfg.n_layer * seq_len * cfg.n_embd


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16


def peak_flops(device):
    """Peak dense bf16 FLOP/s of the GPU, or None when unknown (CPUs: MFU is not reported)."""
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


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
