"""What both halves of a run build from its config: the task, the payload plans, the feedback
mechanisms, the stepsize and the algorithm.

The engine's server half and every client half build the same RunPlan from the same Config, so they
agree on the payload groups, the feedback parameters derived from the compressor's constants and the
stepsize `lr = "theory"` derives from the task's smoothness, without exchanging any of them.

Modes:
- model-delta ("delta", the default): the configured algorithm trains locally and communicates its
  model delta (or its own quantity); the server's estimate is the mechanism's server half ("none":
  the weighted mean) with the algorithm's client shares (example counts, or uniform for Scaffnew/FLIX).
- gradient ("gradient", the registered algorithm of that name): each sampled client sends one local
  gradient at the model it holds and the server steps x <- x - lr g (client shares uniform, so that
  the objective is f = (1/n) sum_i f_i, the objective of the convex tasks and of the theory).

`lr = "theory"` (values written under [resolved] in the run's config.toml):
- delta mode: 1 / max_i L_i, a stable local gradient step on every client's loss;
- gradient mode: the mechanism's stepsize from fedsqueeze.feedback.theory (ef21, efbv, diana) with the
  compressor's (eta, omega), omega_av = omega / cohort (independent randomness) or omega (`randomness =
  "shared"`, fedsqueeze.engine.shared); without feedback
  1 / ((1 + omega_av) L) for an unbiased compressor (1 / L uncompressed). Classic EF and biased
  compressors without feedback have no rule: give lr.
L and L_i are exact for the logistic-regression tasks; otherwise L_i is the largest Hessian eigenvalue
of f_i at the initial model (power iteration) and L is bounded by their mean (estimates, logged as such).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from fedsqueeze import feedback
from fedsqueeze.algorithms import Algorithm, build
from fedsqueeze.algorithms._local import smoothness_estimate
from fedsqueeze.algorithms.gradient import GradientStep
from fedsqueeze.compressors import CompressorError
from fedsqueeze.config import DOWNLINK_FEEDBACK, MODES, RANDOMNESS, THEORY_LR, Config, ConfigError, build_task
from fedsqueeze.feedback.theory import codec_constants, omega_average, theory_stepsize
from fedsqueeze.seeding import derive_seed

from .payloads import UpdatePlan

DELTA_MODE, GRADIENT_MODE = MODES
PLAIN_DOWNLINK = DOWNLINK_FEEDBACK[0]
SHARED = RANDOMNESS[1]

#: power-iteration steps for the smoothness estimate of a task without an exact objective
ESTIMATE_ITERS = 30


@dataclass
class RunPlan:
    cfg: Config
    task: Any
    layout: list[tuple[str, tuple[int, ...]]]
    #: the initial global model, the same on every side (seeded by the run seed)
    x0: torch.Tensor
    uplink: UpdatePlan
    downlink: UpdatePlan
    #: the uplink groups sent exact: a client's first message under init=full
    uplink_dense: UpdatePlan
    #: the downlink groups sent exact: the model a lagging client is resynchronised with
    downlink_dense: UpdatePlan
    #: the uplink mechanism (feedback "none": plain compression, the server half a weighted mean)
    mechanism: feedback.Mechanism
    #: None: the broadcast is the (compressed) model itself
    downlink_feedback: feedback.Downlink | None
    lr: float
    #: values derived when the run starts (theory stepsize, constants, resolved feedback spec)
    resolved: dict[str, Any] = field(default_factory=dict)

    @property
    def stateful(self) -> bool:
        """True when the mechanism keeps client memory (and so the acknowledgement protocol runs)."""
        return self.mechanism.name != "none"

    def new_algorithm(self) -> Algorithm:
        """A fresh algorithm instance (each client worker and the server keep their own)."""
        if self.cfg.mode == GRADIENT_MODE:
            return GradientStep(self.lr)
        algorithm = build(self.cfg.algorithm)
        algorithm.setup(self.task)  # e.g. p = "theory" reads the task's objective
        return algorithm


def plan_for(cfg: Config) -> RunPlan:
    """The RunPlan of a config (built once per process; ConfigError for what the config cannot do)."""
    return _plan_cached(cfg)


@functools.lru_cache(maxsize=8)
def _plan_cached(cfg: Config) -> RunPlan:
    task = build_task(cfg)
    model = task.new_model(seed=derive_seed(cfg.seed, "init"))
    # the communicated vector: the model's parameters, or more (lowrank share="A" adds the A factors)
    shape = build(cfg.algorithm)
    layout = shape.layout(model)
    x0 = shape.initial(model)
    try:
        uplink = UpdatePlan.uplink(layout, cfg)
    except CompressorError as exc:
        raise ConfigError("compressor", cfg.compressor, str(exc)) from None
    try:
        downlink = UpdatePlan.downlink(layout, cfg)
    except CompressorError as exc:
        raise ConfigError("downlink", cfg.downlink, str(exc)) from None
    uplink_dense = uplink.dense_like()
    try:
        mechanism = feedback.build(
            cfg.feedback, uplink, dim=uplink.numel, num_clients=cfg.cohort_count(), dense=uplink_dense,
            shared_randomness=cfg.randomness == SHARED,
        )  # fmt: skip
    except feedback.FeedbackError as exc:
        raise ConfigError("feedback", cfg.feedback, str(exc), feedback.available()) from None
    down = None
    if cfg.downlink != "none" and cfg.downlink_feedback != PLAIN_DOWNLINK:
        down = feedback.Downlink(cfg.downlink_feedback, downlink)
    # which randomness the compressors drew from, beside the constants the theory derived from it
    resolved: dict[str, Any] = {"randomness": cfg.randomness}
    if cfg.feedback != "none" or cfg.mode == GRADIENT_MODE:
        resolved["feedback"] = mechanism.spec
    lr = cfg.lr
    if lr == THEORY_LR:
        details = theory_lr(cfg, task, model, x0, uplink, mechanism)
        lr = details["lr"]
        resolved.update(details)
    return RunPlan(
        cfg=cfg,
        task=task,
        layout=layout,
        x0=x0,
        uplink=uplink,
        downlink=downlink,
        uplink_dense=uplink_dense,
        downlink_dense=downlink.dense_like(),
        mechanism=mechanism,
        downlink_feedback=down,
        lr=float(lr),
        resolved=resolved,
    )


# ---- lr = "theory" -----------------------------------------------------------------------------


def smoothness(task: Any, model: torch.nn.Module, x0: torch.Tensor, seed: int) -> dict[str, Any]:
    """L, L_tilde, max_i L_i: exact for an objective the task defines, else estimated at x0."""
    objective = getattr(task, "objective", None)
    if objective is not None:
        l_i = list(objective.L_i)
        big_l, how = float(objective.L), "exact"
    else:
        l_i = [
            smoothness_estimate(model, [x0], task.loss_fn, c, iters=ESTIMATE_ITERS, seed=derive_seed(seed, i, "L"))
            for i, c in enumerate(task.clients)
        ]
        big_l, how = sum(l_i) / len(l_i), "estimated at the initial model"
    if not all(math.isfinite(v) and v > 0 for v in [*l_i, big_l]):
        raise ConfigError("lr", THEORY_LR, f"the smoothness constants are not positive and finite ({how}): {l_i}")
    l_tilde = math.sqrt(sum(v * v for v in l_i) / len(l_i))
    return {"L": big_l, "L-tilde": l_tilde, "L-max": max(l_i), "smoothness": how}


def theory_lr(
    cfg: Config,
    task: Any,
    model: torch.nn.Module,
    x0: torch.Tensor,
    uplink: UpdatePlan,
    mechanism: feedback.Mechanism,
) -> dict[str, Any]:
    """{"lr": gamma, "lr-rule": ..., and every constant used}; ConfigError where no rule applies."""
    consts = smoothness(task, model, x0, cfg.seed)
    if cfg.mode == DELTA_MODE:
        return {"lr": 1.0 / consts["L-max"], "lr-rule": "1 / max_i L_i (local steps on f_i)", **consts}
    cohort = cfg.cohort_count()
    if mechanism.name == "none":
        try:
            eta, omega = codec_constants(uplink, uplink.numel)
        except feedback.FeedbackError as exc:
            raise ConfigError("lr", THEORY_LR, str(exc)) from None
        if eta > 0:
            raise ConfigError(
                "lr",
                THEORY_LR,
                "a biased compressor without feedback has no theory stepsize; use ef21 or efbv, or give lr",
            )
        omega_av = omega_average(omega, cohort, cfg.randomness == SHARED)
        gamma = 1.0 / ((1.0 + omega_av) * consts["L"])
        return {"lr": gamma, "lr-rule": "1 / ((1 + omega_av) L)", "eta": eta, "omega": omega,
                "omega_av": omega_av, **consts}  # fmt: skip
    try:
        values = theory_stepsize(
            mechanism, uplink, dim=uplink.numel, num_clients=cohort, L=consts["L"], L_tilde=consts["L-tilde"],
            shared_randomness=cfg.randomness == SHARED,
        )  # fmt: skip
    except feedback.FeedbackError as exc:
        raise ConfigError("lr", THEORY_LR, str(exc)) from None
    values = {k: v for k, v in values.items() if k not in ("L", "L_tilde", "mechanism")}
    gamma = values.pop("gamma")
    return {"lr": gamma, "lr-rule": f"{values.pop('rule')} theory stepsize", **values, **consts}
