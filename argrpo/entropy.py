"""Adaptive entropy regularisation: the coefficient c of the `- c * mean token entropy` loss term
(docs/method.md, "Adaptive entropy regularisation").

The schedule shape w(step) in [0, 1]: linear warm-up from 0 over the first `warmup_frac` of the steps,
1 in the middle, cosine decay to 0 from `decay_start_frac` on. With the normalised entropy
H_norm = H / log(V) and err = target - H_norm, two controllers:

- "accumulating" (argrpo's default): a state c starts at `base_coef`; after every iteration the entropy
  it measured updates it, c <- clamp(c * exp(k * err), min_coef, max_coef) when |err| > deadband, and
  the loss uses w(step) * c. Clamping the state rather than the product keeps the controller free of
  wind-up while letting the warm-up start from 0 and the final decay reach 0. The iteration's own
  entropy updates the state after its update (its coefficient comes from the iterations before), so
  that no extra forward pass is spent measuring the entropy before the update.
- "stateless" (the LOO-FID paper's code): nothing carries over; each forward computes
  c = clamp(base_coef * w(step) * exp(k * err), min_coef, max_coef), the exp factor only when
  |err| > deadband, from that forward's own entropy.

Modes: "off" (always 0), "fixed" (w(step) * base_coef, no feedback), "adaptive" (a controller above).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from argrpo.config import Float, require

ENTROPY_MODES = ("off", "fixed", "adaptive")
CONTROLLERS = ("accumulating", "stateless")


@dataclass(frozen=True)
class EntropyConfig:
    mode: str = "adaptive"
    controller: str = "accumulating"  # accumulating | stateless (adaptive mode)
    base_coef: Float = 2.2e-3
    target: Float = 0.78  # normalised entropy H / log(V) the controller steers towards
    deadband: Float = 0.015
    gain_k: Float = 3.0
    min_coef: Float = 7e-5
    max_coef: Float = 4e-3
    warmup_frac: Float = 0.05
    decay_start_frac: Float = 0.85

    def __post_init__(self) -> None:
        require(self.mode in ENTROPY_MODES, "mode", f"must be one of {', '.join(ENTROPY_MODES)}", self.mode)
        require(self.controller in CONTROLLERS, "controller", f"must be one of {', '.join(CONTROLLERS)}",
                self.controller)
        require(self.base_coef >= 0, "base_coef", "must be >= 0", self.base_coef)
        require(0 < self.target <= 1, "target", "must be in (0, 1]", self.target)
        require(self.deadband >= 0, "deadband", "must be >= 0", self.deadband)
        require(self.gain_k >= 0, "gain_k", "must be >= 0", self.gain_k)
        require(self.min_coef > 0, "min_coef", "must be > 0", self.min_coef)
        require(self.max_coef >= self.min_coef, "max_coef", f"must be >= min_coef={self.min_coef}",
                self.max_coef)
        require(0 <= self.warmup_frac <= 1, "warmup_frac", "must be in [0, 1]", self.warmup_frac)
        require(self.warmup_frac <= self.decay_start_frac <= 1, "decay_start_frac",
                f"must be in [warmup_frac={self.warmup_frac}, 1]", self.decay_start_frac)


class EntropyController:
    def __init__(self, cfg: EntropyConfig, total_steps: int, vocab_size: int):
        require(total_steps >= 1, "total_steps", "must be >= 1", total_steps)
        require(vocab_size >= 2, "vocab_size", "must be >= 2", vocab_size)
        self.cfg, self.total_steps, self.log_vocab = cfg, total_steps, math.log(vocab_size)
        self.c = min(max(cfg.base_coef, cfg.min_coef), cfg.max_coef) if cfg.mode == "adaptive" else cfg.base_coef

    @property
    def per_forward(self) -> bool:
        """The coefficient depends on each forward's own entropy (the stateless controller)."""
        return self.cfg.mode == "adaptive" and self.cfg.controller == "stateless"

    def schedule(self, step: int) -> float:
        """The shape w(step) in [0, 1] that multiplies the coefficient."""
        progress, cfg = step / self.total_steps, self.cfg
        if progress < cfg.warmup_frac:
            return progress / cfg.warmup_frac
        if progress < cfg.decay_start_frac:
            return 1.0
        span = 1.0 - cfg.decay_start_frac
        return 0.5 * (1.0 + math.cos(math.pi * (progress - cfg.decay_start_frac) / span)) if span > 0 else 1.0

    def normalised(self, entropy: float) -> float:
        """Mean token entropy (nats) as a fraction of the uniform distribution's log(V)."""
        return float(entropy) / self.log_vocab

    def _feedback(self, entropy: float) -> float:
        """exp(k * err) outside the deadband, 1 inside it (and for a non-finite entropy)."""
        err = self.cfg.target - self.normalised(entropy)
        return math.exp(self.cfg.gain_k * err) if abs(err) > self.cfg.deadband else 1.0

    def coefficient(self, step: int, entropy: float | None = None) -> float:
        """The coefficient to use at `step`; the stateless controller needs the forward's mean token entropy."""
        cfg = self.cfg
        if cfg.mode == "off":
            return 0.0
        if self.per_forward:
            if entropy is None:
                raise ValueError("the stateless entropy controller needs the forward's entropy")
            coef = cfg.base_coef * self.schedule(step) * self._feedback(entropy)
            return min(max(coef, cfg.min_coef), cfg.max_coef)
        return self.schedule(step) * self.c

    def observe(self, entropy: float) -> None:
        """Feed the mean token entropy an iteration measured (the accumulating controller's state)."""
        if self.cfg.mode == "adaptive" and not self.per_forward and math.isfinite(entropy):
            self.c = min(max(self.c * self._feedback(entropy), self.cfg.min_coef), self.cfg.max_coef)

    def update(self, step: int, entropy: float) -> float:
        """`observe` then `coefficient`: the coefficient at `step` once `entropy` has been fed."""
        self.observe(entropy)
        return self.coefficient(step, entropy)

    def state_dict(self) -> dict[str, float]:
        return {"c": self.c}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.c = float(state["c"])
