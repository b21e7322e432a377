import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def make_code_dir(out, text, vocab_size):
    """A miniature out/<preset>/ for the stages that read the code corpus: a tokenizer trained on
    `text` (out/tokenizer.json) and `text` tokenized into code/train.bin, its first third into
    code/val.bin. Returns the tokenizer."""
    import json

    import numpy as np

    import tokenizer
    enc = tokenizer.train([text], vocab_size=vocab_size)
    tokenizer.save(enc, out / "tokenizer.json")
    ids = np.array(enc.encode_ordinary(text), dtype=np.uint16)
    (out / "code").mkdir()
    ids.tofile(out / "code" / "train.bin")
    ids[: len(ids) // 3].tofile(out / "code" / "val.bin")
    (out / "code" / "meta.json").write_text(json.dumps({"dtype": "uint16"}))
    return enc


def run_sh_env(**extra):
    """The environment for a `bash run.sh` subprocess: os.environ plus `extra`, with the directory of
    the interpreter running the tests first on PATH, so that run.sh's `python` is this one (the one
    with the requirements) also when pytest runs from a virtual environment that is not activated."""
    import os
    env = {**os.environ, **{k: str(v) for k, v in extra.items()}}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]).rstrip(os.pathsep)
    return env
