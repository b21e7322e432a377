"""The fast sampler the stages use: model.generate's contract (its arguments, and a Generation back)
at the speed a 2-core CPU needs. tests/test_generate.py checks it against model.generate and
against the distribution temperature / top-k / top-p define; docs/SPEED.md has the measurements.

- sample_next draws a row's token from two uniform numbers and running sums in two levels
  (inverse_cdf) instead of a random number per vocabulary entry; top-p settles most rows without
  sorting (sure_nucleus), the others sort 128, then 1024, then all candidates (sorted_pick);
- StopStrings checks every row's stop strings with one table lookup per step (a byte automaton);
- generate keeps everything per row in tensors, prefills a prompt that several rows share once and
  copies its KV cache to them (distinct_rows), and drops finished rows from the batch;
- sample_completions samples prompt strings in length-sorted batches, cut at Codex's STOP sequences.

Imports go one way: this file uses model.py; model.py never imports it.
"""
import math

import torch
import torch.nn.functional as F

from model import Generation, KVCache, cache_dtype, pad_left


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None, uniform=None):
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
    rows whose nucleus the narrower one did not hold."""
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
             stop=(), eot_id=None, pad_id=0, generator=None, use_cache=True, banned=()):
    """Sample a completion for every prompt (lists of token ids), batched.

    Rows are left-padded to a common length. Each row stops at its first stop string (needs
    `enc`: checked on the tokens' bytes by StopStrings), at `eot_id`, or after max_new_tokens.
    `banned` token ids (padding) are never sampled. `use_cache=False` recomputes the whole
    sequence every step: the naive reference the KV-cache path is tested against.

    The loop keeps everything per row in tensors (sampled tokens, log-probs, stop state, when and
    why a row finished): no Python work per row and step. Finished rows leave the batch (and
    the KV cache) once a quarter of it has finished, so the rest run faster. A prompt that
    several rows share (n samples per problem) is prefilled once and its KV cache copied to them."""
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
    shared = use_cache and len(distinct) < B
    firsts = distinct if shared else prompts
    idx, valid = pad_left(firsts, pad_id, device)
    padded = not bool(valid.all())
    ban = torch.tensor(sorted(banned), dtype=torch.long, device=device)
    stops = StopStrings.build(enc, stop, cfg.vocab_size, device) if stop else None
    sample = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    cache = KVCache(cfg, len(firsts), P + N, device, cache_dtype(model)) if use_cache else None

    # everything per original row b; `rows` lists the rows still in the batch, in batch order
    tokens = torch.zeros(B, N, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, N, device=device)
    end = torch.full((B,), N, dtype=torch.long, device=device)     # tokens kept per row
    why = torch.zeros(B, dtype=torch.long, device=device)          # index into FINISH
    done = torch.zeros(B, dtype=torch.bool, device=device)
    state = torch.zeros(B, dtype=torch.long, device=device)        # StopStrings state
    rows = torch.arange(B, device=device)

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
        n_live = int((~done[rows]).sum())
        if n_live == 0:
            break
        if n_live <= 0.75 * len(rows):  # drop finished rows (a copy: only now and then)
            keep = (~done[rows]).nonzero().squeeze(1)
            rows, tok = rows[keep], tok[keep]
            if cache is not None:
                cache.keep(keep)
            else:
                idx, valid = idx[keep], valid[keep]
        u = None  # the uniform numbers of this step: drawn before the forward, or in sample_next
        if cache is None:  # naive: the whole sequence through the model again
            idx = torch.cat([idx, tok[:, None]], 1)
            valid = torch.cat([valid, torch.ones_like(tok[:, None], dtype=torch.bool)], 1)
            logits, _ = model(idx, valid=valid if padded else None, logits_from=-1)
        else:
            if temperature != 0:
                u = torch.rand(len(rows), 2, dtype=torch.float64, device=device, generator=generator)
            logits, _ = model(tok[:, None], cache=cache)
        tok, logp = _sample(logits[:, -1], ban, sample, u)

    end, why = end.tolist(), why.tolist()
    out_tokens = [t[:n] for t, n in zip(tokens.tolist(), end)]
    out_logprobs = [lp[:n] for lp, n in zip(logprobs.tolist(), end)]
    texts = []
    for toks in out_tokens:
        text = enc.decode([t for t in toks if t != eot_id]) if enc is not None else ""
        cut = min((text.find(s) for s in stop if s in text), default=len(text))
        texts.append(text[:cut])
    return Generation(out_tokens, out_logprobs, texts, [FINISH[w] for w in why])


def _sample(logits, ban, sample, uniform=None):
    """sample_next on the last position's logits (B, V), banned ids excluded."""
    if len(ban):
        logits = logits.index_fill_(1, ban, float("-inf"))  # in place: a fresh tensor
    return sample_next(logits, uniform=uniform, **sample)


STOP = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")  # Codex §2.3: a completion ends at these


def sample_completions(model, enc, prompts, max_new_tokens, temperature=0.0, top_p=None, batch_size=64,
                       generator=None, desc=None):
    """Sample one completion per prompt string with the KV-cache sampler, batched; returns, in the
    order of `prompts`, dicts {completion (cut at the Codex stop sequences), sum_logprob,
    mean_logprob, finish, tokens: as sampled, the token that completed a stop string and the end of
    text included}. Prompts are sorted by length so each batch pads little; an over-long
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
