"""The real lm-evaluation-harness, end to end: its command line (through
``python -m tpa_jax.eval.lm_eval_adapter``) on three local tasks (tests/eval/lm_eval_tasks: multiple
choice, rolling perplexity, generation) with a 60-step t6-tiny checkpoint, the numbers checked
against explicit log-likelihoods from ``run.logits`` and greedy ``run.generate``; and
``simple_evaluate(model="tpa_jax")`` through ``create_from_arg_obj``.  Offline: the tasks load their
jsonl files with the datasets json loader."""
import fnmatch
import glob
import json
import math
import os
import shlex
import string
import subprocess
import sys
import textwrap

import numpy as np
import pytest

# no network: set before the harness (and datasets / huggingface_hub, which read them on import) loads
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed (pip install -e '.[lm-eval]')")

import tpa_jax  # noqa: E402
from tpa_jax.configs import load_train_config  # noqa: E402
from tpa_jax.data import prepare_files  # noqa: E402
from tpa_jax.eval.lm_eval_adapter import TPAJaxLM  # noqa: E402
from tpa_jax.train import train  # noqa: E402
from _util import ROOT  # noqa: E402

pytestmark = pytest.mark.slow
TASKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_tasks")
NL = 10  # prefix token: the byte model is conditioned on "\n" before a text
GEN_TOKS, UNTIL = 16, ("\n", " ")  # tpa_gen.yaml's generation_kwargs


def read_jsonl(name):
    with open(os.path.join(TASKS, name)) as f:
        return [json.loads(line) for line in f if line.strip()]


def offline_env(tmp):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp / "hf"),
               HF_DATASETS_CACHE=str(tmp / "hf" / "datasets"), TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The packaged t6-tiny config for 60 steps on a few standard-library modules (byte tokens): text
    that does not change with the project's own sources, so the trained model (and what it
    generates) stays the same from commit to commit."""
    d = tmp_path_factory.mktemp("lm_eval_e2e")
    files = [m.__file__ for m in (textwrap, shlex, string, fnmatch, glob)]
    manifest = prepare_files(files, d / "shards", "byte", val_fraction=0.3)
    tcfg = load_train_config("t6-tiny", [
        f"run_dir={d / 'run'}", "steps=60", "save_every=60", "batch_size=4", "data.source=manifest",
        f"data.path={manifest}", "data.seq_len=32", "eval_batches=1", "sample_tokens=0",
        "model.compute_dtype=float32"])
    train(tcfg, progress=False)
    return d, d / "run"


def log_probs(run, ids):
    """Explicit log-softmax of one full forward over ``ids``: [len(ids), vocab] float64."""
    logits = np.asarray(run.logits([list(ids)])[0], np.float64)
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def explicit_ll(run, context, continuation):
    """log p(continuation | context): trailing context whitespace moves to the continuation, an
    empty context is the prefix token."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = run.encode(context) or [NL]
    cont = run.encode(continuation)
    lp = log_probs(run, (ctx + cont)[:-1])
    return sum(lp[len(ctx) - 1 + j, t] for j, t in enumerate(cont))


def test_harness_cli_matches_explicit_computation(trained, tmp_path):
    d, run_dir = trained
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "tpa_jax.eval.lm_eval_adapter", "--model", "tpa_jax",
           "--model_args", f"checkpoint={run_dir},prefix_token_id={NL}", "--tasks", "tpa_mc,tpa_ppl,tpa_gen",
           "--include_path", TASKS, "--batch_size", "auto", "--max_batch_size", "4", "--device", "cpu",
           "--output_path", str(out), "--log_samples"]
    # cwd: the task YAMLs name their jsonl files relative to it
    proc = subprocess.run(cmd, cwd=TASKS, env=offline_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results_files = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    assert len(results_files) == 1, (results_files, proc.stderr[-2000:])
    with open(results_files[0]) as f:
        res = json.load(f)
    assert res["config"]["model"] == "tpa_jax"
    r = res["results"]
    run = tpa_jax.load(run_dir)

    # multiple choice: accuracy from explicit log-likelihoods of " " + choice
    mc = read_jsonl("tpa_mc.jsonl")
    hits = [int(np.argmax([explicit_ll(run, doc["question"], " " + c) for c in doc["choices"]]) == doc["answer"])
            for doc in mc]
    assert r["tpa_mc"]["acc,none"] == pytest.approx(np.mean(hits), abs=1e-9)

    # rolling perplexity: each text fits in one window, so its log-likelihood is one forward pass
    texts = [doc["text"] for doc in read_jsonl("tpa_ppl.jsonl")]
    lls = [explicit_ll(run, "", t) for t in texts]
    words = sum(len(t.split()) for t in texts)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert r["tpa_ppl"]["word_perplexity,none"] == pytest.approx(math.exp(-sum(lls) / words), rel=1e-4)
    assert r["tpa_ppl"]["byte_perplexity,none"] == pytest.approx(math.exp(-sum(lls) / n_bytes), rel=1e-4)
    assert r["tpa_ppl"]["bits_per_byte,none"] == pytest.approx(-sum(lls) / n_bytes / math.log(2), rel=1e-4)

    # generation: the logged responses are greedy run.generate cut at the first "\n", then " "
    gen = read_jsonl("tpa_gen.jsonl")
    samples_files = glob.glob(str(out / "**" / "samples_tpa_gen_*.jsonl"), recursive=True)
    assert len(samples_files) == 1
    with open(samples_files[0]) as f:
        samples = sorted((json.loads(line) for line in f if line.strip()), key=lambda s: s["doc_id"])
    got = [s["resps"][0][0] for s in samples]
    full = [run.generate(doc["prompt"], GEN_TOKS) for doc in gen]
    want = []
    for text in full:
        for u in UNTIL:
            text = text.split(u, 1)[0]
        want.append(text)
    assert len(set(want)) > 1 and any(len(w) < len(f) for w, f in zip(want, full))  # not a degenerate case
    assert got == want
    exact = np.mean([w.strip() == doc["target"].strip() for w, doc in zip(want, gen)])
    assert r["tpa_gen"]["exact_match,none"] == pytest.approx(exact, abs=1e-9)


def test_simple_evaluate_by_name(trained, monkeypatch, tmp_path):
    """``simple_evaluate(model="tpa_jax", model_args={...})``: the harness builds the model with
    ``create_from_arg_obj`` and its own batch_size / max_batch_size / device."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    d, run_dir = trained
    for k, v in offline_env(tmp_path).items():
        if k.startswith("HF_"):
            monkeypatch.setenv(k, v)
    monkeypatch.chdir(TASKS)
    built = []
    orig = TPAJaxLM.create_from_arg_obj.__func__

    def spy(cls, arg_dict, additional_config=None):
        built.append(dict(additional_config or {}))
        lm = orig(cls, arg_dict, additional_config)
        built.append(lm.batch_size)
        return lm

    monkeypatch.setattr(TPAJaxLM, "create_from_arg_obj", classmethod(spy))
    res = lm_eval.simple_evaluate(model="tpa_jax", model_args={"checkpoint": str(run_dir), "prefix_token_id": NL},
                                  tasks=["tpa_mc"], task_manager=TaskManager(include_path=TASKS),
                                  batch_size=2, max_batch_size=16, device="cpu")
    assert built == [{"batch_size": 2, "max_batch_size": 16, "device": "cpu"}, 2]
    run = tpa_jax.load(run_dir)
    hits = [int(np.argmax([explicit_ll(run, doc["question"], " " + c) for c in doc["choices"]]) == doc["answer"])
            for doc in read_jsonl("tpa_mc.jsonl")]
    assert res["results"]["tpa_mc"]["acc,none"] == pytest.approx(np.mean(hits), abs=1e-9)
