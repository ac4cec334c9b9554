"""No non-finite value reaches the optimizer, and no stage exits 0 after writing non-finite weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_policy import Brightness, PixelFeatures, TablePolicy, config

from argrpo.checkpoints import save_checkpoint
from argrpo.classifier import DigitClassifier, save_classifier
from argrpo.conditions import class_condition_set, save_condition_set
from argrpo.data import DataConfig, prepare_dataset
from argrpo.gpt import GPT, gpt_config
from argrpo.grpo import NonFiniteError, score_rewards, train_grpo
from argrpo.metrics import load_ref_stats, save_ref_stats
from argrpo.rewards.loo_fid import LooFidReward
from argrpo.vq import VQModel, vq_config

ROOT = Path(__file__).resolve().parents[1]


class FlakyFeatures(PixelFeatures):
    """Pixel features, with one row NaN at the calls listed in `bad_calls` (0-based)."""

    def __init__(self, bad_calls):
        self.bad_calls, self.calls = set(bad_calls), 0

    def features(self, images):
        f = super().features(images).clone()
        if self.calls in self.bad_calls:
            f[1, 2] = float("nan")
        self.calls += 1
        return f


def loo_fid(extractor) -> LooFidReward:
    return LooFidReward(extractor, torch.zeros(12), torch.ones(12), ema_beta=0.5)


def test_nan_reference_moments_are_refused_at_load(tmp_path):
    features = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    save_ref_stats(tmp_path / "ok.npz", features)
    assert np.isfinite(load_ref_stats(tmp_path / "ok.npz")["std"]).all()
    with np.load(tmp_path / "ok.npz") as z:
        arrays = dict(z)
    arrays["mu"][2] = np.nan
    np.savez(tmp_path / "nan.npz", **arrays)
    with pytest.raises(ValueError, match=r"nan\.npz: mu holds 1 non-finite value"):
        load_ref_stats(tmp_path / "nan.npz")
    arrays["mu"][2], arrays["sigma"] = 0.0, arrays["sigma"][:3]
    np.savez(tmp_path / "shape.npz", **arrays)
    with pytest.raises(ValueError, match=r"shape\.npz: mu must be \[F\] and sigma \[F, F\]"):
        load_ref_stats(tmp_path / "shape.npz")


def test_a_nan_feature_skips_that_step_and_moves_no_weight(tmp_path):
    policy, weights = TablePolicy(), []
    reward = loo_fid(FlakyFeatures(bad_calls={1}))
    logged = []

    def log(step, metrics):
        logged.append(metrics)
        weights.append(policy.net.logits.detach().clone())

    before = policy.net.logits.detach().clone()
    train_grpo(policy, {"brightness": (Brightness(), 1.0)}, reward, config(steps=3), tmp_path, log=log,
               progress=False)
    assert [m["health/skipped_update"] for m in logged] == [0.0, 1.0, 0.0]
    assert logged[1]["health/nonfinite_features"] == 1.0 and "fid/ema" not in logged[1]
    assert torch.equal(weights[1], weights[0]) and not torch.equal(weights[0], before)  # step 1 moved nothing
    assert not torch.equal(weights[2], weights[1])  # and training went on
    assert all(torch.isfinite(reward.state_dict()[k]).all() for k in ("m1", "m2"))  # the NaN never entered the EMA
    assert torch.isfinite(policy.net.logits).all() and (tmp_path / "policy.pt").exists()


def test_a_non_finite_loss_skips_the_update_and_is_counted(tmp_path):
    class Exploding(TablePolicy):
        def forward(self, conditions, tokens, temperature=1.0, drop_conditions=False):
            logp, entropy = super().forward(conditions, tokens, temperature, drop_conditions)
            return logp * float("inf") if self.training_calls_poisoned else logp, entropy

    policy = Exploding()
    policy.training_calls_poisoned = True
    before = policy.net.logits.detach().clone()
    with pytest.raises(NonFiniteError, match="3 consecutive GRPO steps"):
        cfg = config(steps=5, fid_advantage_weight=0.0, rewards={"classifier": 1.0})
        train_grpo(policy, {"brightness": (Brightness(), 1.0)}, None, cfg, tmp_path, progress=False)
    assert torch.equal(policy.net.logits, before)  # nothing reached the optimizer
    assert not (tmp_path / "policy.pt").exists()
    rows = (tmp_path / "curves.csv").read_text().splitlines()
    assert len(rows) == 4 and "health/skipped_update" in rows[0]  # header + the 3 skipped steps


def test_repeated_nan_features_stop_the_run_without_writing_a_policy(tmp_path):
    with pytest.raises(NonFiniteError, match=r"3 consecutive GRPO steps \(up to step 3\)"):
        train_grpo(TablePolicy(), {"brightness": (Brightness(), 1.0)}, loo_fid(FlakyFeatures({1, 2, 3})),
                   config(steps=8), tmp_path, progress=False)
    assert not (tmp_path / "policy.pt").exists()


def test_the_composite_reward_cannot_overflow():
    class Huge:
        def __call__(self, images, conditions):
            return torch.tensor([3e38, -3e38, 1e38, 0.0])

    composite, stats = score_rewards({"a": (Huge(), 10.0), "b": (Huge(), 10.0)}, torch.zeros(4, 3, 2, 2),
                                     torch.zeros(4, dtype=torch.long))
    assert composite.dtype == torch.float64 and torch.isfinite(composite).all()
    assert composite[0].item() == pytest.approx(6e39) and stats["reward/a_nonfinite"] == 0.0


def stage_workspace(tmp_path: Path) -> Path:
    """A pipeline checkout whose prepared data, base model and judges exist; the reward classifier is NaN."""
    work = tmp_path / "work"
    work.mkdir()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(gpt_preset="tiny", vq_preset="tiny")
    params["grpo"].update(steps=6, batch_classes=2, group_size=3, checkpoint_every=2)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    prepare_dataset(DataConfig(max_per_class=10), work / "data/dataset.npz")
    save_condition_set(work / "data/prompts_train.npz", class_condition_set([str(i) for i in range(10)]))
    torch.manual_seed(0)
    gpt = GPT(gpt_config("tiny", vocab_size=64, num_classes=10, block_size=64))
    vq = VQModel(vq_config("tiny"))
    save_checkpoint(work / "models/base/gpt.pt", gpt.state_dict())
    save_checkpoint(work / "models/base/vq.pt", vq.state_dict())
    manifest = {name: {"path": f"models/base/{name}.pt"} for name in ("gpt", "vq")}
    (work / "models/base/manifest.json").write_text(json.dumps(manifest))
    judge = DigitClassifier(num_classes=10)
    with torch.no_grad():
        next(judge.parameters()).fill_(float("nan"))  # every feature and every score becomes NaN
    save_classifier(work / "models/judge/reward_classifier.pt", judge)
    save_ref_stats(work / "data/reward_ref_stats.npz", np.random.default_rng(0).normal(size=(50, 64)))
    return work


def test_the_grpo_stage_exits_non_zero_on_repeated_nan_features(tmp_path):
    work = stage_workspace(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    done = subprocess.run([sys.executable, str(ROOT / "stages/grpo.py"), "loofid", "0"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "error: 3 consecutive GRPO steps" in done.stderr and "Traceback" not in done.stderr
    assert not (work / "models/grpo/loofid_s0/policy.pt").exists()
    curves = (work / "models/grpo/loofid_s0/curves.csv").read_text()
    assert "health/nonfinite_features" in curves and "reward/classifier_nonfinite" in curves
