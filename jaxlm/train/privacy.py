"""Differentially private training, DP-SGD (config.privacy; Abadi et al. 2016).

Each step samples its examples at random (below), clips every example's gradient to L2
norm config.privacy.l2_clip, sums them, adds Gaussian noise of std noise_multiplier *
l2_clip to the sum once, and divides by the public expected batch size. The accountant
then says what the whole run costs: (epsilon, delta)-DP of the trained parameters with
respect to one training example, logged every log step (metrics "epsilon") and stored
in every checkpoint's meta and in results.json ("privacy").

Where each part runs (the gradient seam of jaxlm.train.step):
  * clipping: `clipped_value_and_grad` replaces the step's per-microbatch `grad_fn`
    inside the microbatch scan: jax-privacy's `clipped_grad` vmaps the objective over the
    microbatch's examples, clips each one's gradient and sums them, so at most one
    microbatch of per-example gradients exists at a time (config.train.microbatches is
    the memory knob, and is exact: clipping is per example, whatever the split);
  * noise and denominator: `step.finalize`, after the cross-device reduction, with a key
    split from the step's, so it is added once (jit: one program; pmap: every replica
    draws the same noise for the same reduced sum) and is reproduced on resume.
Library choice: jax-privacy's `clipped_grad` for the clipping, since it is the part
that carries the guarantee and it has the edge cases written down and tested (NaN/inf
gradients zeroed instead of leaking, padding examples contributing exactly zero, a
stated sensitivity); dp-accounting (which jax-privacy brings) for the accountant and
the noise calibration. optax.contrib.differentially_private_aggregate was not used: it
takes every example's gradient of the whole batch at once and draws its noise inside
the optimizer, so it fits neither microbatches nor the finalize phase. The noise itself
is one line here (jax-privacy's `gaussian_privatizer` is an optimizer transform holding
its own key, the same mismatch).

Sampling, and the accountant that matches it (the guarantee holds for what runs):
  poisson (default): step s includes each of the N examples independently with
      probability q = E / N, E = privacy.expected_batch_size (0: half the rows). The
      step has config.train.batch_size rows R: a draw of n <= R examples fills n rows
      and the rest are padding at weight 0; a draw above R is cut to a uniformly random
      R of them. dp-accounting's TruncatedSubsampledGaussianDpEvent is exactly this
      mechanism (PLD accountant); adjacency: adding or removing one example. The cut is
      why R should be about 2E: at R = E the analysis costs several times the epsilon.
  fixed: step s takes a uniformly random set of exactly R examples (without
      replacement within the step, independently across steps). RDP accountant with
      SampledWithoutReplacementDpEvent; adjacency: replacing one example (N public),
      under which one example moves the clipped sum by up to 2 * l2_clip, so the event's
      noise multiplier is noise_multiplier / 2.
Neither is the shuffled-epoch order that non-private training reads (jaxlm.data):
shuffling has no matching accountant here, so `Sampled` draws each step afresh.
The denominator is E (poisson) or R (fixed), never the realised count or token weight:
both depend on the data (under add/remove the count of sampled examples is itself
private), and a data-dependent divisor would change the sensitivity. The update is then
the unbiased estimate of the mean clipped gradient, plus noise.

The privacy unit is one example: a labelled example, or for language-model data one
window of config.data.seq_len tokens (a document spread over several windows, or a
person over several documents, is protected only as group privacy). Refused, in one
line naming the field, where the guarantee would not hold: packed rows
(config.data.packing), next-sentence pairs, augmentation that inserts other texts' words
(config.validate), a training set of unknown size (synthetic corpus, mixtures), delta
not below 1 / N, a target epsilon no noise up to NOISE_RANGE[1] reaches in the run's
steps, and resuming with other privacy settings. Not covered by the guarantee: the logged
training loss and accuracy (read from the private batch, for the operator only), and
anything written from the data beside the params (e.g. the data fingerprint). The
non-finite check looks at the noised gradient only: a data-dependent skip would leak.

Randomness: sampling, noise and dropout come from one key that replaces the run's RNG
key (kept in every checkpoint, so a resume continues it exactly). config.privacy.seed
-1 draws it from the operating system: an adversary who knew it could regenerate the
noise and subtract it, so a set seed (reproducible experiments) gives the guarantee only
as long as the config stays secret.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm.errors import CheckpointError, ConfigError

# Noise multipliers the target-epsilon solve searches: a target the low end already meets
# gets the low end (less epsilon than allowed; smaller noise buys nothing useful); one that
# needs more than the high end is refused as unreachable (the noise would drown any signal
# of a plausible batch).
NOISE_RANGE = (0.3, 100.0)
# PLD accountant's loss discretization: 1e-3 instead of dp-accounting's 1e-4 makes it 10x
# faster (per log step) for an epsilon a few 1e-4 larger (still an upper bound).
PLD_DISCRETIZATION = 1e-3
_SAMPLE_STREAM = 5  # seed-sequence tag of the per-step draws


def enabled(cfg_privacy) -> bool:
    return bool(cfg_privacy.noise_multiplier or cfg_privacy.target_epsilon)


def examples_per_step(cfg_privacy, rows: int) -> int:
    """Examples a step holds (on average, under Poisson sampling) out of its `rows`."""
    if not enabled(cfg_privacy) or cfg_privacy.sampling == "fixed":
        return rows
    return cfg_privacy.expected_batch_size or max(rows // 2, 1)


# ----------------------------------------------------------------------------- the step


def clipped_value_and_grad(loss_fn, clip):
    """`grad_fn` of jaxlm.train.step.local_sums for DP-SGD: one microbatch's
    ((loss sum, (weight sum, {metric: sum})), sum of per-example clipped gradients).
    Each example runs the objective alone (a batch of one, its own dropout key); rows of
    weight 0 (Poisson padding) contribute exactly zero. `clip` may be traced."""
    import jax_privacy  # only private runs pay its import

    clipped = jax_privacy.clipped_grad(
        lambda params, example, rng: loss_fn(params, example, rng, deterministic=False),
        argnums=0, has_aux=True, l2_clip_norm=clip, batch_argnums=1, keep_batch_dim=True,
        return_values=True, prng_argnum=2)

    def grad_fn(params, micro: dict, rng: jax.Array):
        weights = micro["weights"]
        padding_N = jnp.sum(weights.reshape(weights.shape[0], -1), axis=1) == 0
        grads, aux = clipped(params, micro, rng, is_padding_example=padding_N)
        weight_N, metrics_N = aux.aux
        total = lambda x: jnp.sum(x.astype(jnp.float32))  # noqa: E731
        sums = (total(weight_N), jax.tree_util.tree_map(total, metrics_N))
        return (total(aux.values), sums), grads
    return grad_fn


def add_noise(grads, rng: jax.Array, std: jax.Array):
    """`grads` plus i.i.d. N(0, std^2) on every coordinate."""
    noise = optax.tree.random_like(rng, grads, jax.random.normal)
    return jax.tree_util.tree_map(lambda g, n: g + (std * n).astype(g.dtype), grads, noise)


# ----------------------------------------------------------------------------- accounting


@dataclasses.dataclass(frozen=True)
class Accountant:
    """The privacy cost of `steps` steps of this sampling and noise (dp-accounting)."""
    sampling: str            # "poisson" | "fixed"
    dataset_size: int        # N
    rows: int                # R: rows of a step (train.batch_size)
    expected: int            # E: examples of a step on average (fixed: R)
    noise_multiplier: float  # sigma: noise std / l2_clip
    delta: float

    @property
    def adjacency(self) -> str:
        return "add or remove one example" if self.sampling == "poisson" else \
            "replace one example"

    @property
    def method(self) -> str:
        return "PLD" if self.sampling == "poisson" else "RDP"

    def event(self):
        """One step as a dp-accounting event."""
        import dp_accounting
        if self.sampling == "poisson":
            return dp_accounting.TruncatedSubsampledGaussianDpEvent(
                dataset_size=self.dataset_size,
                sampling_probability=self.expected / self.dataset_size,
                truncated_batch_size=self.rows, noise_multiplier=self.noise_multiplier)
        # Replace-one moves the clipped sum by up to 2 * l2_clip: half the multiplier.
        return dp_accounting.SampledWithoutReplacementDpEvent(
            self.dataset_size, self.rows, dp_accounting.GaussianDpEvent(self.noise_multiplier / 2))

    def new_accountant(self):
        import dp_accounting
        from dp_accounting import pld, rdp
        if self.sampling == "poisson":
            return pld.PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
                                     value_discretization_interval=PLD_DISCRETIZATION)
        return rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)

    @functools.lru_cache(maxsize=None)
    def epsilon(self, steps: int) -> float:
        """Epsilon at `delta` after `steps` steps."""
        if steps <= 0:
            return 0.0
        accountant = self.new_accountant()
        accountant.compose(self.event(), int(steps))
        return float(accountant.get_epsilon(self.delta))


def solve_noise(accountant: Accountant, steps: int, target: float) -> float:
    """The smallest noise multiplier whose run of `steps` steps spends at most `target`
    epsilon (dp-accounting's calibrate_dp_mechanism, to 1e-3); ConfigError if even
    NOISE_RANGE[1] spends more."""
    from dp_accounting import SelfComposedDpEvent, mechanism_calibration
    lo, hi = NOISE_RANGE
    at = lambda sigma: dataclasses.replace(accountant, noise_multiplier=float(sigma))  # noqa: E731
    most = at(hi).epsilon(steps)
    if most > target:
        raise ConfigError(
            f"config.privacy.target_epsilon={target} is unreachable in the run's {steps} "
            f"steps: even noise_multiplier={hi:g} spends epsilon {most:.3g} at delta "
            f"{accountant.delta:g}; allow more epsilon, fewer steps (config.train.steps or "
            "config.finetune.epochs) or a smaller expected batch")
    if at(lo).epsilon(steps) <= target:
        return lo
    return float(mechanism_calibration.calibrate_dp_mechanism(
        accountant.new_accountant, lambda sigma: SelfComposedDpEvent(at(sigma).event(), steps),
        target, accountant.delta, mechanism_calibration.ExplicitBracketInterval(lo, hi),
        tol=1e-3))


# ----------------------------------------------------------------------------- sampling


class Sampled:
    """The training examples as DP-SGD samples them, by global index like every source:
    row r of step s (index s * R + r) is the r-th example drawn for step s from the
    source's first N examples (its epoch 0, a fixed order of the whole set), or padding
    once the draw is used up. The draws come from (key, step) alone, so every process
    and every resume sees the same ones."""

    def __init__(self, source, dataset_size: int, rows: int, expected: int, sampling: str,
                 key: np.ndarray):
        self.source, self.N, self.rows, self.expected = source, dataset_size, rows, expected
        self.sampling, self.words = sampling, [int(w) for w in np.asarray(key).reshape(-1)]
        self._draws: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def draw(self, step: int) -> np.ndarray:
        """The example indices (into the source's first N) of step `step`."""
        with self._lock:
            if step in self._draws:
                return self._draws[step]
        rng = np.random.default_rng([*self.words, _SAMPLE_STREAM, step])
        if self.sampling == "poisson":
            # Poisson sampling as a binomial count, then that many distinct examples
            # uniformly (the same distribution); a count above the rows is cut to them.
            n = min(int(rng.binomial(self.N, self.expected / self.N)), self.rows)
        else:
            n = self.rows
        chosen = rng.choice(self.N, size=n, replace=False)
        with self._lock:
            self._draws = {s: d for s, d in self._draws.items() if s >= step - 2}
            self._draws[step] = chosen
        return chosen

    def is_padding(self, index: int) -> bool:
        step, row = divmod(index, self.rows)
        return row >= len(self.draw(step))

    def example(self, index: int) -> dict:
        step, row = divmod(index, self.rows)
        chosen = self.draw(step)
        return self.source.example(int(chosen[row]) if row < len(chosen) else 0)

    def make_example(self, make):
        """The objective's `example(window, index, read)`, with padding rows at weight 0."""
        def example(window, index: int, read=None) -> dict:
            out = make(window, index, read)
            if self.is_padding(index):
                out = {**out, "weights": np.zeros_like(out["weights"])}
            return out
        return example

    def stats(self) -> dict:
        return self.source.stats()

    def fingerprint(self) -> str:
        return self.source.fingerprint()


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Plan:
    """What a private run does and costs, fixed before it writes anything."""
    accountant: Accountant
    l2_clip: float
    key: np.ndarray            # uint32 raw PRNG key: sampling, noise and dropout
    target_epsilon: float      # 0: the noise was given
    planned_steps: int         # config.train.steps the noise was solved for

    @property
    def noise_std(self) -> float:
        return self.accountant.noise_multiplier * self.l2_clip

    @property
    def denominator(self) -> int:
        return self.accountant.expected

    def epsilon(self, steps: int) -> float:
        return self.accountant.epsilon(int(steps))

    def sampled(self, source) -> Sampled:
        a = self.accountant
        return Sampled(source, a.dataset_size, a.rows, a.expected, a.sampling, self.key)

    def record(self, steps: int) -> dict:
        """The guarantee after `steps` steps, as stored in checkpoints and results."""
        a = self.accountant
        return {"epsilon": self.epsilon(steps), "delta": a.delta, "steps": int(steps),
                "noise_multiplier": a.noise_multiplier, "l2_clip": self.l2_clip,
                "target_epsilon": self.target_epsilon or None,
                "planned_steps": self.planned_steps, "sampling": a.sampling,
                "dataset_size": a.dataset_size, "expected_batch_size": a.expected,
                "rows": a.rows, "adjacency": a.adjacency,
                "accountant": f"dp-accounting {a.method}"}

    def describe(self) -> str:
        a = self.accountant
        what = (f"Poisson sampling, {a.expected} of {a.dataset_size:,} examples per step on "
                f"average in {a.rows} rows" if a.sampling == "poisson" else
                f"{a.rows} of {a.dataset_size:,} examples per step, drawn without replacement")
        return (f"differential privacy: {what}; per-example clip {self.l2_clip:g}, noise "
                f"multiplier {a.noise_multiplier:.4g}; epsilon "
                f"{self.epsilon(self.planned_steps):.4g} at delta {a.delta:g} after "
                f"{self.planned_steps} steps ({a.adjacency}; dp-accounting {a.method})")


def dataset_size(source, cfg) -> int:
    """N: the training examples DP-SGD samples from and the accountant counts."""
    n = len(source) if hasattr(source, "__len__") else source.stats().get("sequences_per_epoch")
    if not n:
        raise ConfigError(f"config.privacy needs a training set of known size to sample from "
                          f"and account for; config.data.name={cfg.data.name!r} is "
                          f"{'a mixture' if cfg.data.name == 'mixture' else 'unbounded'}: "
                          "use one prepared dataset")
    return int(n)


def fresh_key(cfg) -> np.ndarray:
    """The run's key: from config.privacy.seed (folded with config.train.seed), or with
    seed -1 from the operating system (process 0's, on every process)."""
    if cfg.privacy.seed >= 0:
        key = jax.random.fold_in(jax.random.PRNGKey(cfg.privacy.seed), cfg.train.seed)
        return np.asarray(jax.device_get(key), np.uint32)
    shape = jax.random.PRNGKey(0).shape
    key = np.frombuffer(os.urandom(4 * math.prod(shape)), np.uint32).reshape(shape).copy()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        key = np.asarray(multihost_utils.broadcast_one_to_all(key), np.uint32)
    return key


def make_plan(cfg, source, meta: dict | None) -> Plan | None:
    """The plan of a private run (None if config.privacy is off), after the checks that
    need the data: its size against delta and the batch, and the noise (solved for
    config.privacy.target_epsilon, or on a resume the checkpoint's). Writes nothing."""
    p, rows = cfg.privacy, cfg.train.batch_size
    if not enabled(p):
        return None
    n = dataset_size(source, cfg)
    if p.delta >= 1 / n:
        raise ConfigError(f"config.privacy.delta={p.delta:g} is not below 1 / {n} (the "
                          "training examples): releasing one example outright would meet "
                          "it; use a smaller delta")
    expected = examples_per_step(p, rows)
    if expected > n:
        field = "privacy.expected_batch_size" if p.sampling == "poisson" else "train.batch_size"
        raise ConfigError(f"config.{field}={expected} exceeds the {n} training examples")
    accountant = Accountant(p.sampling, n, rows, expected, float(p.noise_multiplier),
                            float(p.delta))
    saved = (meta or {}).get("privacy")
    if saved:  # a resume goes on with the noise it started with
        if p.target_epsilon and saved["planned_steps"] != cfg.train.steps:
            raise CheckpointError(
                f"config.train.steps={cfg.train.steps}, but the noise of this run was solved "
                f"for config.privacy.target_epsilon={p.target_epsilon} over "
                f"{saved['planned_steps']} steps; pass the same steps to resume")
        accountant = dataclasses.replace(accountant, noise_multiplier=saved["noise_multiplier"])
        key = np.asarray(meta["rng"], np.uint32)
    else:
        if p.target_epsilon:
            accountant = dataclasses.replace(
                accountant, noise_multiplier=solve_noise(accountant, cfg.train.steps,
                                                         p.target_epsilon))
        key = fresh_key(cfg)
    return Plan(accountant, float(p.l2_clip), key, float(p.target_epsilon), cfg.train.steps)
