"""AdamW with linear warmup, cosine decay and a weight-decay mask; global-norm clipping
(applied by the train step's finalize with the norm it computes anyway); magnitude pruning
after AdamW when config.prune asks for it (jaxlm.train.prune)."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import optax

from jaxlm.train import prune


def learning_rate_schedule(cfg_opt, total_steps: int) -> optax.Schedule:
    """0 -> peak linearly over warmup_steps, then cosine from peak to peak*min_lr_ratio."""
    peak = cfg_opt.learning_rate
    warmup = optax.linear_schedule(0.0, peak, max(cfg_opt.warmup_steps, 1))
    decay = optax.cosine_decay_schedule(peak, max(total_steps - cfg_opt.warmup_steps, 1),
                                        alpha=cfg_opt.min_lr_ratio)
    return optax.join_schedules([warmup, decay], [cfg_opt.warmup_steps])


def decay_mask(params, no_decay: tuple[str, ...]):
    """True for parameters that get weight decay: those whose path names none of `no_decay`.

    With the default ("bias", "scale") that excludes all biases and LayerNorm scales;
    add "embedding" to exclude the token/position tables too.
    """
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    mask = {path: not any(name in part for part in path for name in no_decay)
            for path in flat}
    return flax.traverse_util.unflatten_dict(mask)


def adamw(cfg_opt, total_steps: int) -> optax.GradientTransformation:
    """AdamW with the schedule and the weight-decay mask."""
    return optax.adamw(learning_rate_schedule(cfg_opt, total_steps), b1=cfg_opt.b1,
                       b2=cfg_opt.b2, eps=cfg_opt.eps, weight_decay=cfg_opt.weight_decay,
                       mask=lambda params: decay_mask(params, tuple(cfg_opt.no_decay)))


def make_optimizer(cfg_opt, total_steps: int, cfg_prune=None,
                   params=None) -> optax.GradientTransformation:
    """What the train step applies after clipping: AdamW, then pruning (config.prune, of
    the trainable `params`, abstract or not) when it is on. Without pruning the optimizer
    is AdamW alone, so the optimizer state has the layout of checkpoints made before
    pruning existed (jaxlm.checkpoint.STATE_LAYOUT 2). Global-norm clipping
    (cfg_opt.grad_clip_norm) is done by the step itself (jaxlm.train.step.finalize, with
    `clip_factor`), which has the gradient norm already (for its metrics and the non-finite
    check) and scales the gradients in the same pass that averages them; computing the norm
    again in an optax clip cost a second pass over every gradient (measured: 100 more
    reductions per step for a 6-layer GPT)."""
    tx = adamw(cfg_opt, total_steps)
    if cfg_prune is None or not prune.enabled(cfg_prune):
        return tx
    if params is None:
        raise ValueError("make_optimizer: pruning needs the trainable params (their paths)")
    return optax.chain(tx, prune.prune(cfg_prune, params))


def clip_factor(grad_norm: jax.Array, max_norm: float) -> jax.Array:
    """The factor optax.clip_by_global_norm scales by: 1 below max_norm (0 = no clipping),
    max_norm / grad_norm above."""
    if max_norm <= 0:
        return jnp.ones_like(grad_norm)
    return jnp.where(grad_norm < max_norm, 1.0, max_norm / grad_norm)

