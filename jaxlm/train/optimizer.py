"""AdamW with linear warmup, cosine decay, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

import flax
import optax


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


def make_optimizer(cfg_opt, total_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(cfg_opt, total_steps)
    adamw = optax.adamw(schedule, b1=cfg_opt.b1, b2=cfg_opt.b2, eps=cfg_opt.eps,
                        weight_decay=cfg_opt.weight_decay,
                        mask=lambda params: decay_mask(params, tuple(cfg_opt.no_decay)))
    if cfg_opt.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg_opt.grad_clip_norm), adamw)
    return adamw

