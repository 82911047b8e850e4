"""A T6 training step with ``attention_impl="splash"`` exports for TPU from this CPU host: the
splash kernel is lowered by Mosaic (a ``tpu_custom_call``), not run by the Pallas interpreter."""
import jax
import jax.numpy as jnp

from tpa_jax import configs
from tpa_jax.config import DataConfig, OptimConfig, TrainConfig
from tpa_jax.model import init_params
from tpa_jax.train.optimizer import lr_schedule, make_optimizer
from tpa_jax.train.step import make_train_step


def test_t6_train_step_exports_for_tpu():
    cfg = configs.get("t6-tiny", attention_impl="splash")  # bfloat16 compute, as on a TPU
    tcfg = TrainConfig(model=cfg, data=DataConfig(seq_len=256), optim=OptimConfig(warmup_steps=0), steps=10,
                       batch_size=2)
    tx = make_optimizer(tcfg.optim, tcfg.steps)
    step = make_train_step(tcfg, tx, lr_schedule(tcfg.optim, tcfg.steps))
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
             "opt_state": jax.eval_shape(tx.init, params)}
    tokens = jax.ShapeDtypeStruct((2, 256), jnp.int32)
    exported = jax.export.export(jax.jit(step), platforms=("tpu",))(state, {"inputs": tokens, "targets": tokens})
    assert exported.platforms == ("tpu",)
    module = exported.mlir_module()
    # forward, dq and dkv kernels (inside the layer scan: each appears once)
    assert module.count("tpu_custom_call") >= 3, module.count("tpu_custom_call")
    want = jax.tree.leaves(jax.eval_shape(step, state, {"inputs": tokens, "targets": tokens}))
    assert [(a.shape, a.dtype) for a in exported.out_avals] == [(w.shape, w.dtype) for w in want]
