"""tpa_jax.load on a trained run (the README's t6-tiny config, shortened), eval.py perplexity and
generate, and the one-line errors for missing, empty and corrupt checkpoints and unknown steps."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

import tpa_jax
from tpa_jax import parallel
from tpa_jax.configs import load_train_config
from tpa_jax.data import prepare_files
from tpa_jax.data.pipeline import eval_batches
from tpa_jax.eval.cli import main as eval_main
from tpa_jax.run import CheckpointError
from tpa_jax.train import train
from _util import ROOT



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The packaged t6-tiny config (the README's main command) for 4 steps on a small corpus of project
    sources, checkpoints at steps 2 and 4."""
    d = tmp_path_factory.mktemp("load")
    files = sorted(os.path.join(ROOT, "tpa_jax", f) for f in os.listdir(os.path.join(ROOT, "tpa_jax"))
                   if f.endswith(".py"))
    manifest = prepare_files(files, d / "shards", "byte", val_fraction=0.3)
    tcfg = load_train_config("t6-tiny", [
        f"run_dir={d / 'run'}", "steps=4", "save_every=2", "batch_size=4", "data.source=manifest",
        f"data.path={manifest}", "data.seq_len=32", "eval_batches=1", "sample_tokens=0",
        "model.compute_dtype=float32"])
    out = train(tcfg, progress=False)
    return d / "run", manifest, out


def test_load_restores_the_trained_params(trained):
    run_dir, _, out = trained
    run = tpa_jax.load(run_dir)
    assert run.step == 4 and run.train_config.steps == 4
    assert run.config == tpa_jax.configs.get("t6-tiny", compute_dtype="float32")
    assert run.tokenizer.name == "byte"
    for a, b in zip(jax.tree_util.tree_leaves(run.params), jax.tree_util.tree_leaves(out["state"]["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert tpa_jax.load(os.path.join(run_dir, "checkpoints"), step=2).step == 2
    text = run.generate("def ", 12)
    ref = tpa_jax.generate(run.params, run.config, [run.tokenizer.encode("def ")], 12)
    assert text == run.tokenizer.decode(ref.tokens[0]) and len(text.encode()) <= 12
    assert run.generate(["a", "class B"], 5) == [run.generate("a", 5), run.generate("class B", 5)]


def test_run_repr_is_one_short_line(trained):
    """A notebook shows the run, not its arrays: step, mechanism, size, parameter count, tokenizer, where."""
    run_dir, _, _ = trained
    run = tpa_jax.load(run_dir)
    text = repr(run)
    n = tpa_jax.accounting.model_params(run.config)
    assert text.startswith("Run(step=4, attention='tpa', n_layer=2, d_model=64") and f"params={n:,}" in text
    assert "tokenizer='byte'" in text and os.path.join(str(run_dir), "checkpoints") in text
    assert "\n" not in text and len(text) < 250 and "Array" not in text


def test_load_onto_a_mesh(trained):
    run_dir, _, out = trained
    mesh = parallel.make_mesh(data=1, fsdp=8, tensor=1)
    run = tpa_jax.load(run_dir, mesh=mesh)
    emb = run.params["embed"]["embedding"]
    assert emb.sharding.mesh.shape == mesh.shape and len(emb.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(emb), np.asarray(out["state"]["params"]["embed"]["embedding"]))


def test_checkpoint_errors_are_one_line(trained, tmp_path):
    run_dir, _, _ = trained
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tpa_jax.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoints"):
        tpa_jax.load(tmp_path / "empty")
    with pytest.raises(CheckpointError, match=r"step 3 not found .*\[2, 4\]"):
        tpa_jax.load(run_dir, step=3)
    # corrupt the latest step: load falls back to step 2 and deletes nothing
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    state4 = bad / "checkpoints" / "4" / "state"
    for dp, _, fs in os.walk(state4):
        for f in fs:
            open(os.path.join(dp, f), "wb").close()
    assert tpa_jax.load(bad).step == 2
    assert os.path.isdir(state4)
    with pytest.raises(CheckpointError, match="no readable checkpoint") as e:
        tpa_jax.load(bad, step=4)
    assert "\n" not in str(e.value)


def test_eval_perplexity_matches_an_explicit_mean(trained, tmp_path, capsys):
    run_dir, manifest, _ = trained
    assert eval_main(["perplexity", "--checkpoint", str(run_dir), "--batch-size", "2", "--max-batches", "3",
                      "--out", str(tmp_path / "ppl.json")]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run = tpa_jax.load(run_dir)
    nll = []
    for batch in eval_batches(str(manifest), 32, 2, 3):
        logp = jax.nn.log_softmax(run.logits(batch["inputs"]), axis=-1)
        nll.append(-np.take_along_axis(np.asarray(logp), batch["targets"][..., None], -1)[..., 0])
    expected = float(np.mean(np.concatenate(nll)))
    assert res["tokens"] == 3 * 2 * 32
    np.testing.assert_allclose(res["loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(res["ppl"], np.exp(expected), rtol=1e-5)
    assert json.load(open(tmp_path / "ppl.json"))["loss"] == res["loss"]


def test_eval_generate_and_its_errors(trained, capsys):
    run_dir, _, _ = trained
    assert eval_main(["generate", "--checkpoint", str(run_dir), "--prompt", "import ", "--max-new-tokens", "8",
                      "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["completions"] == [tpa_jax.load(run_dir).generate("import ", 8)] and res["step"] == 4
    assert eval_main(["generate", "--checkpoint", str(run_dir), "--step", "3", "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checkpoint step 3 not found") and "\n" not in err
    assert eval_main(["generate", "--checkpoint", str(run_dir), "--prompt", "x" * 2000]) == 2
    assert "longer than max_len" in capsys.readouterr().err
