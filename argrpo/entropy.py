"""Adaptive entropy regularisation: the coefficient c of the `- c * mean token entropy` loss term.

Two parts combine multiplicatively:
- the schedule shape w(step) in [0, 1]: linear warm-up from 0 over the first `warmup_frac` of the
  steps, 1 in the middle, cosine decay to 0 from `decay_start_frac` on;
- the controller state c, which starts at `base_coef` and, whenever the normalised entropy
  H_norm = H / log(V) misses `target` by more than `deadband`, is multiplied by exp(k * err) with
  err = target - H_norm and clamped to [min_coef, max_coef] (docs/method.md, "Adaptive entropy").

The coefficient used in the loss is w(step) * c. Clamping the state rather than the product keeps
the controller free of wind-up (c never leaves the band however long the entropy stays off target)
while still letting the warm-up start from 0 and the final decay reach 0.
Modes: "off" (always 0), "fixed" (w(step) * base_coef, no feedback), "adaptive" (the above).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from argrpo.config import Float, require

ENTROPY_MODES = ("off", "fixed", "adaptive")


@dataclass(frozen=True)
class EntropyConfig:
    mode: str = "adaptive"
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
    def __init__(self, mode: str, base_coef: float, target: float, deadband: float, gain_k: float,
                 min_coef: float, max_coef: float, warmup_frac: float, decay_start_frac: float,
                 total_steps: int, vocab_size: int):
        # the config validates the values; building it here gives direct callers the same checks
        EntropyConfig(mode, base_coef, target, deadband, gain_k, min_coef, max_coef, warmup_frac,
                      decay_start_frac)
        require(total_steps >= 1, "total_steps", "must be >= 1", total_steps)
        require(vocab_size >= 2, "vocab_size", "must be >= 2", vocab_size)
        self.mode, self.base_coef, self.target, self.deadband = mode, base_coef, target, deadband
        self.gain_k, self.min_coef, self.max_coef = gain_k, min_coef, max_coef
        self.warmup_frac, self.decay_start_frac = warmup_frac, decay_start_frac
        self.total_steps, self.log_vocab = total_steps, math.log(vocab_size)
        self.c = min(max(base_coef, min_coef), max_coef) if mode == "adaptive" else base_coef

    @classmethod
    def from_config(cls, cfg: EntropyConfig, total_steps: int, vocab_size: int) -> EntropyController:
        return cls(cfg.mode, cfg.base_coef, cfg.target, cfg.deadband, cfg.gain_k, cfg.min_coef, cfg.max_coef,
                   cfg.warmup_frac, cfg.decay_start_frac, total_steps, vocab_size)

    def schedule(self, step: int) -> float:
        """The shape w(step) in [0, 1] that multiplies the coefficient."""
        progress = step / self.total_steps
        if progress < self.warmup_frac:
            return progress / self.warmup_frac
        if progress < self.decay_start_frac:
            return 1.0
        span = 1.0 - self.decay_start_frac
        return 0.5 * (1.0 + math.cos(math.pi * (progress - self.decay_start_frac) / span)) if span > 0 else 1.0

    def normalised(self, entropy: float) -> float:
        """Mean token entropy (nats) as a fraction of the uniform distribution's log(V)."""
        return float(entropy) / self.log_vocab

    def update(self, step: int, entropy: float) -> float:
        """Feed the mean token entropy measured at `step`; return the coefficient to use at `step`."""
        if self.mode == "off":
            return 0.0
        if self.mode == "adaptive":
            err = self.target - self.normalised(entropy)
            if abs(err) > self.deadband:
                self.c = min(max(self.c * math.exp(self.gain_k * err), self.min_coef), self.max_coef)
        return self.schedule(step) * self.c

    def state_dict(self) -> dict[str, float]:
        return {"c": self.c}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.c = float(state["c"])
