"""Bad training-config values and keys: every one is a single-line ``ValueError`` naming the full
dotted field, raised while the config is read (before anything is compiled); the train CLI prints
one ``error:`` line for them and exits 2."""
import pytest

from tpa_jax.config import OptimConfig, TrainConfig
from tpa_jax.configs import load_train_config
from tpa_jax.train.cli import main

BAD = [  # (override, text the message must contain)
    ("data.seqlen=3", "did you mean 'data.seq_len'?"),
    ("optim.lrr=1", "did you mean 'optim.lr'?"),
    ("model.n_layr=2", "did you mean 'model.n_layer'?"),
    ("stepz=3", "did you mean 'steps'?"),
    ("steps.x=1", "steps"),
    ("steps=1.5", "steps"),
    ("steps=true", "steps"),
    ("batch_size=\"4\"", "batch_size"),
    ("data.tokenizer=3", "data.tokenizer"),
    ("data.cache_dir=3", "data.cache_dir"),
    ("data.path=[1]", "data.path"),
    ("data.source=7", "data.source"),
    ("data.recall_noise=1", "data.recall_noise"),
    ("sample_prompt=5", "sample_prompt"),
    ("run_dir=5", "run_dir"),
    ("nan_policy=1", "nan_policy"),
    ("profile_steps=5", "profile_steps"),
    ("profile_steps=[3,1]", "profile_steps"),
    ("profile_steps=[1,2,3]", "profile_steps"),
    ("profile_steps=[-1,2]", "profile_steps"),
    ("profile_steps=[1.5,2]", "profile_steps"),
    ("keep_every=0", "keep_every"),
    ("keep_every=1.5", "keep_every"),
    ("optim.lr=nan", "optim.lr"),
    ("optim.lr=NaN", "optim.lr"),
    ("optim.lr=inf", "optim.lr"),
    ("optim.lr=1e400", "optim.lr"),
    ("optim.grad_clip=Infinity", "optim.grad_clip"),
    ("optim.weight_decay=true", "optim.weight_decay"),
    ("seed=4294967296", "seed"),
    ("seed=-1", "seed"),
    ("seed=true", "seed"),
    ("model.d_model=1.5", "model.d_model"),
    ("model.contextual_a=1", "model.contextual_a"),
    ("model.rope_theta=Infinity", "model.rope_theta"),
    ("mesh=3", "mesh"),
    ("mesh.data=\"2\"", "mesh.data"),
]


@pytest.mark.parametrize("override,needle", BAD, ids=[o for o, _ in BAD])
def test_bad_override_is_one_line(override, needle):
    with pytest.raises(ValueError) as e:
        load_train_config(None, [override])
    msg = str(e.value)
    assert "\n" not in msg and needle in msg, msg


@pytest.mark.parametrize("override", ["seed=4294967295", "keep_every=null", "keep_every=5",
                                      "profile_steps=[0,2]", "optim.lr=1", "data.cache_dir=null"])
def test_edge_values_accepted(override):
    load_train_config(None, [override])


def test_dataclasses_check_directly():
    with pytest.raises(ValueError, match="OptimConfig.lr"):
        OptimConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="OptimConfig.min_lr"):
        OptimConfig(min_lr=float("inf"))
    with pytest.raises(ValueError, match="TrainConfig.keep_every"):
        TrainConfig(keep_every=0)
    with pytest.raises(ValueError, match="TrainConfig.seed"):
        TrainConfig(seed=2**32)
    with pytest.raises(ValueError, match="TrainConfig.profile_steps"):
        TrainConfig(profile_steps=5)
    with pytest.raises(ValueError, match=r"did you mean 'seq_len'\?"):
        TrainConfig.from_dict({"data": {"seqlen": 3}})


@pytest.mark.parametrize("override", ["data.seqlen=3", "optim.lr=nan", "keep_every=0", "sample_prompt=5"])
def test_cli_prints_one_error_line(override, capsys):
    assert main([override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and override.split("=")[0] in err[0], err
