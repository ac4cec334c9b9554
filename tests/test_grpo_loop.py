"""The GRPO loop on a tiny GPT and VQ: one step's invariants, learning, a real SIGKILL and resume, config errors."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from argrpo.checkpoints import load_gpt
from argrpo.classifier import DigitClassifier
from argrpo.config import ConfigError
from argrpo.entropy import EntropyConfig
from argrpo.generator import LlamaGenPolicy
from argrpo.gpt import GPT, gpt_config
from argrpo.grpo import GRPOConfig, grpo_config_from_params, train_grpo
from argrpo.rewards.classifier import ClassifierReward
from argrpo.rewards.loo_fid import LooFidConfig, LooFidReward
from argrpo.sampling import SamplingConfig, sample_tokens
from argrpo.vq import VQModel, vq_config

REPO = Path(__file__).resolve().parents[1]
GPT_CFG = gpt_config("tiny", vocab_size=64, num_classes=10, block_size=16)  # 4x4 tokens -> 8x8 images


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine spinning threads cost 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(seed: int = 0):
    torch.manual_seed(seed)
    policy = GPT(GPT_CFG)
    torch.nn.init.normal_(policy.output.weight, std=0.5)  # LlamaGen zero-inits it: make the policy non-uniform
    vq = VQModel(vq_config("tiny"))
    judge = DigitClassifier(num_classes=10, width=4, feat_dim=8).eval()
    return policy, vq, judge


def small_cfg(**overrides) -> GRPOConfig:
    base = dict(steps=1, batch_classes=2, group_size=4, inner_epochs=2, lr=2e-2, checkpoint_every=1,
                sampling=SamplingConfig(cfg_scale=1.5), precision="fp32", kl_beta=0.1)
    return GRPOConfig(**{**base, **overrides})


def run(cfg, out_dir, rewards=None, loo=True, seed=0):
    policy, vq, judge = build(seed)
    rewards = rewards if rewards is not None else {"classifier": (ClassifierReward(judge), 1.0)}
    loo_fid = LooFidReward(judge, torch.zeros(8), torch.ones(8), ema_beta=0.5) if loo else None
    logged = []
    policy = train_grpo(LlamaGenPolicy(policy, vq), rewards, loo_fid, cfg, out_dir,
                        log=lambda step, m: logged.append(m), progress=False)
    return policy.net, logged


def test_one_step_invariants(tmp_path):
    start = build()[0].state_dict()
    policy, logged = run(small_cfg(), tmp_path)
    (m,) = logged
    assert m["policy/ratio_mean_epoch0"] == 1.0 and m["policy/clip_frac_epoch0"] == 0.0
    assert m["policy/ratio_mean"] != 1.0  # the second inner epoch sees the moved policy
    # the sampler's conditional log-probs (guided rollouts, KV cache) equal the teacher-forced ones
    assert m["policy/sampler_logp_gap"] < 1e-5
    assert m["reward/classifier_nonfinite"] == 0.0 and m["fid/batch"] > 0 and m["fid/ema"] > 0
    assert m["advantage/mean"] == pytest.approx(0.0, abs=1e-6)
    assert 0 < m["entropy/normalised"] < 1 and m["entropy/coef"] == 0.0  # warm-up starts at 0
    changed = [k for k, v in policy.state_dict().items() if not torch.equal(v, start[k])]
    assert "output.weight" in changed and any(k.startswith("layers.") for k in changed)
    saved = load_gpt(tmp_path / "policy.pt", GPT_CFG)
    for k, v in saved.state_dict().items():
        assert torch.equal(v, policy.state_dict()[k]), k
    rows = list(csv.DictReader((tmp_path / "curves.csv").open()))
    assert len(rows) == 1 and float(rows[0]["policy/ratio_mean_epoch0"]) == 1.0


def test_micro_batches_give_the_full_batch_update(tmp_path):
    start = build(0)[0].state_dict()
    whole, _ = run(small_cfg(lr=2e-3), tmp_path / "whole")
    split, _ = run(small_cfg(lr=2e-3, micro_batch=3), tmp_path / "split")  # 8 sequences as 3 + 3 + 2
    # summing in another order changes gradients in the last bits, and Adam divides each by sqrt(v):
    # a gradient near Adam's eps turns that rounding into a visible step, so a handful of weights may
    # differ slightly. A wrongly weighted micro-batch changes the update of nearly every weight.
    moved = torch.cat([(whole.state_dict()[k] - v).flatten() for k, v in start.items()]).abs()
    diff = torch.cat([(split.state_dict()[k] - v).flatten() for k, v in whole.state_dict().items()]).abs()
    assert moved.max() > 1e-3  # the update is real
    assert (diff > 2e-5).float().mean() < 1e-3 and diff.max() < 2e-4


def test_reward_goes_up(tmp_path):
    class Brightness:  # a reward the policy can reach through the tokens it picks
        def __call__(self, images, labels):
            return images.mean(dim=(1, 2, 3))

    def mean_brightness(policy, vq):  # the policy's expected reward, on 100 fixed-seed samples
        labels = torch.arange(10).repeat(10)
        tokens = sample_tokens(policy, labels, SamplingConfig(cfg_scale=1.5),
                               generator=torch.Generator().manual_seed(5)).tokens
        return vq.decode_tokens(tokens).mean().item()

    start, vq, _ = build()
    cfg = small_cfg(steps=10, batch_classes=2, group_size=6, kl_beta=0.0, lr=1e-2, fid_advantage_weight=0.0,
                    entropy=EntropyConfig(mode="off"))
    trained, _ = run(cfg, tmp_path, rewards={"brightness": (Brightness(), 1.0)}, loo=False)
    before, after = mean_brightness(start, vq), mean_brightness(trained, vq)
    assert after > before + 0.02, (before, after)  # -0.081 -> -0.038 when written


def test_non_finite_scores_are_zeroed_and_counted(tmp_path):
    class Flaky:
        def __call__(self, images, labels):
            scores = images.mean(dim=(1, 2, 3))
            scores[0], scores[3] = float("nan"), float("inf")
            return scores

    policy, logged = run(small_cfg(), tmp_path, rewards={"flaky": (Flaky(), 1.0)}, loo=False)
    assert logged[0]["reward/flaky_nonfinite"] == 2.0
    assert all(torch.isfinite(p).all() for p in policy.parameters())


def tiny_run(out: str, pause: float) -> None:
    """The run the SIGKILL test kills, resumes and repeats: 6 steps, a checkpoint after each."""
    policy, vq, judge = build()
    loo_fid = LooFidReward(judge, torch.zeros(8), torch.ones(8), ema_beta=0.5)

    def log(step, metrics):
        with open(f"{out}/steps_run.txt", "a") as f:
            f.write(f"{step}\n")
        time.sleep(pause)  # leaves the parent time to kill us between checkpoints

    cfg = small_cfg(steps=6, checkpoint_every=1, loo_fid=LooFidConfig(bootstrap=True, bootstrap_batches=1,
                                                                      ema_beta=0.5))
    train_grpo(LlamaGenPolicy(policy, vq), {"classifier": (ClassifierReward(judge), 1.0)}, loo_fid, cfg, out,
               log=log, progress=False)


SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_grpo_loop import tiny_run
tiny_run(sys.argv[1], float(sys.argv[2]))
"""


def saved_step(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["step"])
    except FileNotFoundError:
        return 0


def test_sigkill_then_resume_finishes_like_an_uninterrupted_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    killed.mkdir()
    clean.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    victim = subprocess.Popen([sys.executable, str(script), str(killed), "0.5"], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while saved_step(killed / "state.pt") < 2:
        assert victim.poll() is None, victim.stdout.read().decode()
        assert time.monotonic() < deadline, "no checkpoint for step 2 within 120 s"
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (killed / "policy.pt").exists()
    resumed_from = saved_step(killed / "state.pt")
    assert 2 <= resumed_from < 6
    first_run = [int(s) for s in (killed / "steps_run.txt").read_text().split()]

    # one thread here as in the killed process (fixture), so that the runs agree bit for bit
    tiny_run(str(killed), 0.0)  # the re-run: a fresh policy resumed from state.pt
    tiny_run(str(clean), 0.0)
    second_run = [int(s) for s in (killed / "steps_run.txt").read_text().split()][len(first_run):]
    assert second_run == list(range(resumed_from, 6))  # no step before the checkpoint is redone
    assert saved_step(killed / "state.pt") == 6
    rows = list(csv.DictReader((killed / "curves.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(6))

    # RNG, optimizer, reference, LOO-FID and entropy state all came back: the same final weights
    resumed = torch.load(killed / "policy.pt", weights_only=True)["model"]
    uninterrupted = torch.load(clean / "policy.pt", weights_only=True)["model"]
    for k, v in uninterrupted.items():
        assert torch.equal(resumed[k], v), k
    clean_rows = list(csv.DictReader((clean / "curves.csv").open()))
    assert [r["fid/ema"] for r in rows] == [r["fid/ema"] for r in clean_rows]


@pytest.mark.parametrize("section, message", [
    ({"group_size": 1}, "grpo.group_size must be >= 2, got 1"),
    ({"inner_epochs": 0}, "grpo.inner_epochs must be >= 1, got 0"),
    ({"rewards": {"classifer": 1.0}}, "grpo.rewards.classifer is not a known reward; valid rewards: aesthetic, "
                                      "classifier, classifier_prob, clip"),
    ({"rewards": {"clip": -0.5}}, "grpo.rewards.clip must be >= 0, got -0.5"),
    ({"rewards": {"loo_fid": 1.0}}, "grpo.rewards.loo_fid is not an instance reward"),
    ({"ref_ema_decay": 1.0}, "grpo.ref_ema_decay must be in [0, 1), got 1.0"),
    ({"ratio_level": "batch"}, "grpo.ratio_level must be one of sequence, token, got 'batch'"),
    ({"loo_fid": {"ema_beta": 1.0}}, "grpo.loo_fid.ema_beta must be in [0, 1), got 1.0"),
    ({"loo_fid": {"mode": "exact"}}, "grpo.loo_fid.mode must be one of loo_batch, ema_loo, ema_scalar"),
    ({"entropy": {"gain_k": -1}}, "grpo.entropy.gain_k must be >= 0, got -1"),
    ({"sampling": {"temperature": 0}}, "grpo.sampling.temperature must be > 0, got 0"),
    ({"clip_epsilon": 0.2}, "grpo.clip_epsilon is not a known parameter"),
])
def test_bad_params_name_the_key(section, message):
    with pytest.raises(ConfigError) as err:
        grpo_config_from_params(section)
    assert str(err.value).startswith(message)


def test_params_build_nested_settings():
    cfg = grpo_config_from_params({"group_size": 8, "betas": [0.9, 0.99], "rewards": {"classifier": 2.0},
                                   "loo_fid": {"mode": "loo_batch", "ema_beta": 0.5},
                                   "sampling": {"cfg_scale": 2.0, "top_k": 10}, "entropy": {"mode": "fixed"}})
    assert cfg.group_size == 8 and cfg.betas == (0.9, 0.99) and cfg.rewards == {"classifier": 2.0}
    assert cfg.loo_fid == LooFidConfig(mode="loo_batch", ema_beta=0.5)
    assert cfg.sampling.cfg_scale == 2.0 and cfg.sampling.top_k == 10 and cfg.entropy.mode == "fixed"
    assert grpo_config_from_params({}) == GRPOConfig()
    assert GRPOConfig().sampling.cfg_scale == 1.5  # the LOO-FID paper's rollout guidance
