"""The train step (gradient accumulation and the non-finite skip policy inside), the eval steps
(loss; loss plus recall counts) and the sharded initial state.  All are built from the model's one
entry point (``tpa_jax.model.loss_fn`` / ``logits_fn`` / ``init_params``) and returned unjitted:
the training loop jits them with its shardings."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..config import ModelConfig, TrainConfig
from ..data.recall import recall_counts
from ..model import cross_entropy, init_params, logits_fn, loss_fn

State = dict  # {"step": int32 scalar, "params": pytree, "opt_state": optax state}
Batch = dict  # {"inputs": int32 [B, T], "targets": int32 [B, T]}


def make_train_step(tcfg: TrainConfig, tx: optax.GradientTransformation,
                    schedule: Callable[[Any], jax.Array]) -> Callable[[State, Batch], tuple[State, dict]]:
    """``(state, batch) -> (state, metrics)`` with metrics {"loss", "grad_norm", "lr", "finite",
    "params_finite"}: ``finite`` holds when the loss, the gradient norm and the updated params all are.

    The global batch is split into ``accum_steps`` micro-batches whose gradients are averaged inside
    one ``lax.scan``, so k micro-steps of b equal one step of k*b.  Under ``nan_policy="skip"`` an
    update whose loss, gradient norm or updated params are not finite is dropped (params and optimizer
    state kept); the step counter advances either way.
    """
    accum = tcfg.optim.accum_steps
    skip_nonfinite = tcfg.nan_policy == "skip"
    grad_fn = jax.value_and_grad(loss_fn(tcfg.model))

    def step(state, batch):
        params = state["params"]
        inputs, targets = batch["inputs"], batch["targets"]
        if accum == 1:
            loss, grads = grad_fn(params, inputs, targets)
        else:
            micro = jax.tree_util.tree_map(lambda x: x.reshape((accum, -1) + x.shape[1:]), (inputs, targets))

            def body(carry, mb):
                loss_sum, grad_sum = carry
                l, g = grad_fn(params, *mb)
                return (loss_sum + l, jax.tree_util.tree_map(jnp.add, grad_sum, g)), None

            zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
            (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), micro)
            loss, grads = loss / accum, jax.tree_util.tree_map(lambda g: g / accum, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree_util.tree_leaves(new_params)]))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & params_finite
        if skip_nonfinite:
            keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
            new_params, opt_state = keep(new_params, params), keep(opt_state, state["opt_state"])
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]), "finite": finite,
                   "params_finite": params_finite}
        return {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}, metrics

    return step


def make_eval_step(cfg: ModelConfig) -> Callable[[Any, Batch], jax.Array]:
    """``(params, batch) -> mean loss`` (to be jitted)."""
    loss = loss_fn(cfg)

    def eval_step(params, batch):
        return loss(params, batch["inputs"], batch["targets"])

    return eval_step


def make_recall_eval_step(cfg: ModelConfig) -> Callable[[Any, Batch], dict]:
    """``(params, batch) -> {"loss", "correct", "total", "all_correct", "examples"}`` (to be jitted):
    the loss and the counts behind ``tpa_jax.data.recall.recall_accuracy``."""
    logits_of = logits_fn(cfg)

    def eval_step(params, batch):
        logits = logits_of(params, batch["inputs"])
        return {"loss": cross_entropy(logits, batch["targets"]),
                **recall_counts(logits, batch["targets"], xp=jnp)}

    return eval_step


def init_state(tcfg: TrainConfig, mesh: Mesh, tx: optax.GradientTransformation) -> tuple[State, Any]:
    """(state, state shardings): params initialised sharded on ``mesh``; the optimizer moments
    inherit the params' shardings, scalar counters are replicated."""
    params = init_params(tcfg.model, jax.random.key(tcfg.seed), mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": jax.jit(tx.init)(params)}
    shardings = jax.tree_util.tree_map(
        lambda x: x.sharding if isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh else replicated,
        state)
    return jax.device_put(state, shardings), shardings
