import dataclasses
import inspect
import json

import numpy as np
import pytest

import common
import pretrain
from conftest import make_code_dir


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    """A miniature out/<preset>/: a tokenizer and code .bin files made from this repo's own sources."""
    out = tmp_path_factory.mktemp("out")
    text = inspect.getsource(common) + inspect.getsource(pretrain)
    make_code_dir(out, text, vocab_size=320)
    return out


def small_config(**kw):
    base = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=4, grad_accum=2, max_iters=8,
                warmup_iters=2, eval_interval=4, eval_iters=2, lr=3e-3)
    base.update(kw)
    return pretrain.Config(**base)


def test_resumed_run_continues_the_same_loss_curve(out_dir):
    straight = pretrain.train(small_config(), out_dir)
    assert pretrain.train(small_config(), out_dir) == straight  # deterministic
    pretrain.train(small_config(), out_dir, stop_at=4)  # interrupted after step 4's checkpoint
    resumed = pretrain.train(small_config(), out_dir, resume=True)
    assert [s for s, _ in resumed] == list(range(4, 8))
    assert np.allclose([l for _, l in resumed], [l for _, l in straight[4:]], rtol=1e-5, atol=1e-6)


def test_loss_goes_down(out_dir):
    history = pretrain.train(small_config(max_iters=30, eval_interval=30), out_dir)
    assert np.mean([l for _, l in history[-5:]]) < np.mean([l for _, l in history[:5]]) - 0.5
    results = json.loads((out_dir / "results.json").read_text())
    assert results["models"]["base"]["val_loss"] > 0


def test_config_cli_overrides_and_errors(capsys):
    cfg, args = common.parse_config(pretrain.Config, pretrain.PRESETS,
                                    ["--preset", "small", "--lr=1e-4", "--compile", "--out_dir", "/tmp/x"])
    assert cfg.lr == 1e-4 and cfg.compile is True and cfg.n_embd == pretrain.PRESETS["small"]["n_embd"]
    assert str(args.out_dir) == "/tmp/x"
    with pytest.raises(SystemExit):
        common.parse_config(pretrain.Config, pretrain.PRESETS, ["--no_such_field=3"])
    with pytest.raises(SystemExit):
        common.parse_config(pretrain.Config, pretrain.PRESETS, ["--lr=fast"])
    assert "expected a float" in capsys.readouterr().err
