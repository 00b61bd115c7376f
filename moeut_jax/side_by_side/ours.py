"""One training run of moeut-jax on the shared setup, with the variant's options."""
from __future__ import annotations

import time

import numpy as np

from moeut_jax.side_by_side.shared import VOCAB, Setup, Variant


def build_model(setup: Setup, variant: Variant):
  """MoEUTLM of the setup with the variant's options (see moeut_jax/side_by_side)."""
  import jax.numpy as jnp  # noqa: PLC0415
  from kernels import CvmmConfig  # noqa: PLC0415
  from moeut_jax import MoEUTLM  # noqa: PLC0415
  compute = jnp.bfloat16 if setup.dtype == "bfloat16" else jnp.float32
  cvmm = (CvmmConfig(impl="original", original_path=setup.original_path)
          if "original_cvmm" in variant.options else CvmmConfig())
  router = compute if "original_routers" in variant.options else jnp.float32
  rope = compute if "original_rope" in variant.options else jnp.float32
  return MoEUTLM(VOCAB, **setup.model, dtype=compute, router_dtype=router, cvmm=cvmm,
                 rope_table_dtype=rope, scan_unroll=setup.scan_unroll)


def train(setup: Setup, variant: Variant, log=print, progress=None) -> dict:
  """Trains moeut-jax on the setup; returns its curves (see :mod:`.worker`).
  ``progress``, if given, gets the curves so far after every held-out evaluation."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import optax  # noqa: PLC0415
  from moeut_jax.convert import from_torch_state_dict  # noqa: PLC0415

  model = build_model(setup, variant)
  params = jax.tree_util.tree_map(jnp.asarray, from_torch_state_dict(setup.init, model=model))
  lrs = jnp.asarray(setup.lrs)
  parts = [optax.clip_by_global_norm(setup.grad_clip)] if setup.grad_clip > 0 else []
  tx = optax.chain(*parts, optax.adamw(lambda count: lrs[count], b1=setup.betas[0],
                                       b2=setup.betas[1], eps=setup.eps,
                                       weight_decay=setup.weight_decay))
  opt_state = tx.init(params)

  def cross_entropy(params, tokens, train):
    out = model.apply({"params": params}, tokens[:, :-1], train=train)
    logp = jax.nn.log_softmax(out.outputs.astype(jnp.float32), axis=-1)
    ce = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
    return ce, out.reg_loss

  @jax.jit
  def step(params, opt_state, tokens):
    def loss(params):
      ce, reg = cross_entropy(params, tokens, True)
      return ce + reg, ce
    (_, ce), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, ce, optax.global_norm(grads)

  evaluate = jax.jit(lambda params, tokens: cross_entropy(params, tokens, False)[0])

  def heldout() -> float:
    return float(np.mean([float(evaluate(params, jnp.asarray(b))) for b in setup.heldout]))

  train_losses, grad_norms, held, t0 = [], [], [], time.time()
  evals = set(setup.eval_steps())
  for s in range(setup.steps):
    params, opt_state, ce, norm = step(params, opt_state, jnp.asarray(setup.train[s]))
    train_losses.append(float(ce))
    grad_norms.append(float(norm))
    if s + 1 in evals:
      held.append((s + 1, heldout()))
      log(f"step {s + 1}: loss {train_losses[-1]:.4f}, held-out {held[-1][1]:.4f} "
          f"({time.time() - t0:.0f} s)")
      if progress is not None:
        progress(dict(train_loss=list(train_losses), grad_norm=list(grad_norms),
                      heldout=list(held), seconds=time.time() - t0))
  device = jax.devices()[0]
  return dict(train_loss=train_losses, grad_norm=grad_norms, heldout=held,
              seconds=time.time() - t0,
              device=getattr(device, "device_kind", device.platform), jax=jax.__version__)
