"""The adaptive entropy controller on a scripted entropy sequence, coefficients worked out by hand."""

import math

import pytest

from argrpo.config import ConfigError, load_section
from argrpo.entropy import EntropyConfig, EntropyController

V = 16


def controller(mode: str = "adaptive", total_steps: int = 20, kind: str = "accumulating") -> EntropyController:
    # 20 steps: warm-up over steps 0-1 (10 %), constant, cosine decay from step 16 (80 %)
    cfg = EntropyConfig(mode, kind, base_coef=2.2e-3, target=0.78, deadband=0.015, gain_k=3.0, min_coef=7e-5,
                        max_coef=4e-3, warmup_frac=0.1, decay_start_frac=0.8)
    return EntropyController(cfg, total_steps=total_steps, vocab_size=V)


def test_schedule_shape():
    ctl = controller()
    assert [ctl.schedule(s) for s in (0, 1, 2, 10, 15, 16)] == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0, 1.0])
    assert ctl.schedule(18) == pytest.approx(0.5)  # halfway through the decay: (1 + cos(pi/2)) / 2
    assert ctl.schedule(19) == pytest.approx(0.5 * (1 - math.sqrt(0.5)))  # (1 + cos(3pi/4)) / 2


def test_scripted_entropy_sequence():
    ctl = controller()
    H = math.log(V)  # entropy of the uniform distribution; the controller sees entropy / H
    script = [  # (step, normalised entropy, expected coefficient)
        (0, 0.78, 0.0),  # on target; warm-up starts at 0
        (1, 0.70, 0.5 * 2.2e-3 * math.exp(3 * 0.08)),  # err 0.08 > deadband: c rises
        (2, 0.79, 2.2e-3 * math.exp(0.24)),  # |err| = 0.01 inside the deadband: c holds
        (5, 0.30, 4e-3),  # 2.2e-3 * e^(0.24 + 1.44) = 1.18e-2, clamped to the maximum
        (6, 0.90, 4e-3 * math.exp(-0.36)),  # too much entropy: c falls from the clamp at once
        (10, 1.00, 4e-3 * math.exp(-0.36 - 0.66)),
        (11, 1.00, 4e-3 * math.exp(-0.36 - 2 * 0.66)),
        (12, 1.00, 4e-3 * math.exp(-0.36 - 3 * 0.66)),
        (13, 1.00, 4e-3 * math.exp(-0.36 - 4 * 0.66)),  # 1.99e-4
        (14, 1.00, 4e-3 * math.exp(-0.36 - 5 * 0.66)),  # 1.03e-4
        (15, 1.00, 7e-5),  # 5.3e-5 clamped to the minimum
        (16, 0.70, 7e-5 * math.exp(0.24)),  # no wind-up below the clamp: one step back up
        (18, 0.78, 0.5 * 7e-5 * math.exp(0.24)),  # decay halves it (the product may go below min_coef)
    ]
    for step, h_norm, expected in script:
        assert ctl.update(step, h_norm * H) == pytest.approx(expected, rel=1e-9), step
    assert ctl.normalised(0.5 * H) == pytest.approx(0.5)


def test_the_accumulating_controller_uses_the_entropy_of_earlier_iterations():
    ctl = controller()
    H = math.log(V)
    assert ctl.coefficient(2) == pytest.approx(2.2e-3)  # nothing observed yet: the base coefficient
    ctl.observe(0.70 * H)
    assert ctl.coefficient(3, entropy=0.10 * H) == pytest.approx(2.2e-3 * math.exp(0.24))  # this forward's ignored
    ctl.observe(float("nan"))  # a non-finite measurement leaves the state alone
    assert ctl.c == pytest.approx(2.2e-3 * math.exp(0.24))


def test_stateless_controller_is_the_schedule_times_the_feedback_clamped():
    ctl = controller(kind="stateless")
    H = math.log(V)
    trace = [(0, 0.70), (1, 0.70), (1, 0.79), (5, 0.30), (6, 0.90), (10, 1.0), (17, 0.70), (18, 0.78), (19, 0.2)]
    for step, h_norm in trace:
        err = 0.78 - h_norm
        expected = 2.2e-3 * ctl.schedule(step) * (math.exp(3.0 * err) if abs(err) > 0.015 else 1.0)
        assert ctl.coefficient(step, h_norm * H) == pytest.approx(min(max(expected, 7e-5), 4e-3), rel=1e-12)
    assert ctl.coefficient(0, 0.70 * H) == 7e-5  # the warm-up's 0 is clamped up to the minimum
    assert ctl.coefficient(5, 0.30 * H) == 4e-3  # 2.2e-3 * e^1.44 clamped down
    ctl.observe(0.1 * H)  # nothing carries over between forwards
    assert ctl.coefficient(10, 0.78 * H) == pytest.approx(2.2e-3) and ctl.c == pytest.approx(2.2e-3)
    with pytest.raises(ValueError, match="needs the forward's entropy"):
        ctl.coefficient(3)


def test_fixed_and_off_modes_ignore_entropy():
    fixed, off = controller("fixed"), controller("off")
    for step, h in [(1, 0.0), (5, 0.0), (18, 10.0)]:
        assert fixed.update(step, h) == pytest.approx(2.2e-3 * fixed.schedule(step))
        assert off.update(step, h) == 0.0


def test_state_dict_round_trip():
    ctl = controller()
    ctl.update(5, 0.3 * math.log(V))
    other = controller()
    other.load_state_dict(ctl.state_dict())
    assert other.update(6, 0.78 * math.log(V)) == ctl.update(6, 0.78 * math.log(V)) == pytest.approx(4e-3)


@pytest.mark.parametrize("key, value, message", [
    ("mode", "pid", "grpo.entropy.mode must be one of off, fixed, adaptive, got 'pid'"),
    ("controller", "pid", "grpo.entropy.controller must be one of accumulating, stateless, got 'pid'"),
    ("max_coef", 1e-5, "grpo.entropy.max_coef must be >= min_coef=7e-05, got 1e-05"),
    ("decay_start_frac", 0.01, "grpo.entropy.decay_start_frac must be in [warmup_frac=0.05, 1], got 0.01"),
    ("target", 1.5, "grpo.entropy.target must be in (0, 1], got 1.5"),
])
def test_bad_settings_name_the_key(key, value, message):
    with pytest.raises(ConfigError) as err:
        load_section(EntropyConfig, {key: value}, "grpo.entropy")
    assert str(err.value) == message
