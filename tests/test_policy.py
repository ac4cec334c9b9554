"""The policy interface: GRPO runs unchanged on LlamaGen and on a test-only policy of another shape."""

import pytest
import torch
from torch import nn

from argrpo.generator import LlamaGenPolicy
from argrpo.gpt import GPT, gpt_config
from argrpo.grpo import GRPOConfig, train_grpo
from argrpo.policy import Policy, Rollout, decode_images
from argrpo.rewards.loo_fid import LooFidConfig, LooFidReward
from argrpo.sampling import SamplingConfig, draw
from argrpo.vq import VQModel, vq_config


class Brightness:
    """A reward any policy can reach: the mean pixel value."""

    def __call__(self, images, conditions):
        return images.mean(dim=(1, 2, 3))


class PixelFeatures:
    """LOO-FID features: the flattened pixels themselves."""

    def features(self, images):
        return images.flatten(1)


class Palette(nn.Module):
    """A frozen 'tokenizer': token t of 5 paints its 1x1 pixel the grey level t / 2 - 1."""

    def forward(self, tokens):
        return (tokens.float() / 2 - 1)[:, None, :].expand(-1, 3, -1).reshape(-1, 3, 2, 2)


class TablePolicy(Policy):
    """4 tokens, 3 conditions, vocabulary 5: an independent categorical per (condition, position)."""

    num_conditions, num_tokens, vocab_size = 3, 4, 5

    def __init__(self, seed: int = 0):
        net = nn.Module()
        net.logits = nn.Parameter(torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(seed)))
        super().__init__(net, Palette())

    def forward(self, conditions, tokens, temperature=1.0, drop_conditions=False):
        logp = (self.net.logits[conditions] / temperature).log_softmax(-1)  # [N, 4, 5]
        return logp.gather(-1, tokens[..., None])[..., 0], -(logp.exp() * logp).sum(-1)

    @torch.no_grad()
    def rollout(self, conditions, sampling, generator=None):
        self.check_conditions(conditions)
        logits = self.net.logits[conditions] / sampling.temperature  # [N, 4, 5]
        tokens = draw(logits.softmax(-1).flatten(0, 1), generator).view(-1, 4)
        return Rollout(tokens, logits.log_softmax(-1).gather(-1, tokens[..., None])[..., 0])

    @torch.no_grad()
    def decode(self, tokens):
        return self.tokenizer(tokens)

    def forward_passes(self, sampling):
        return 1.0


def config(**overrides) -> GRPOConfig:
    base = dict(steps=2, batch_classes=3, group_size=4, inner_epochs=2, lr=5e-2, kl_beta=0.1, checkpoint_every=1,
                precision="fp32", sampling=SamplingConfig(), fid_advantage_weight=1.0,
                loo_fid=LooFidConfig(ema_beta=0.5), rewards={})
    return GRPOConfig(**{**base, **overrides})


def expected_brightness(policy: TablePolicy) -> float:
    probs = policy.net.logits.detach().softmax(-1)  # [3, 4, 5]
    return float((probs * (torch.arange(5) / 2 - 1)).sum(-1).mean())


def test_a_policy_of_another_shape_trains_through_the_same_loop(tmp_path):
    policy = TablePolicy()
    start, before = policy.net.logits.detach().clone(), expected_brightness(policy)
    loo_fid = LooFidReward(PixelFeatures(), torch.zeros(12), torch.ones(12), ema_beta=0.5)
    logged = []
    trained = train_grpo(policy, {"brightness": (Brightness(), 1.0)}, loo_fid, config(steps=6), tmp_path,
                         log=lambda step, m: logged.append(m), progress=False)
    assert trained is policy and not torch.equal(policy.net.logits, start)
    assert expected_brightness(policy) > before + 0.05  # the reward it was trained on went up
    assert logged[0]["policy/ratio_mean_epoch0"] == 1.0 and logged[0]["policy/sampler_logp_gap"] < 1e-6
    assert all(m["health/skipped_update"] == 0.0 for m in logged) and "fid/ema" in logged[0]
    saved = torch.load(tmp_path / "policy.pt", weights_only=True)["model"]
    assert set(saved) == {"logits"} and torch.equal(saved["logits"], policy.net.logits.detach())


def test_llamagen_takes_a_step_through_the_interface(tmp_path):
    torch.manual_seed(0)
    gpt = GPT(gpt_config("tiny", vocab_size=64, num_classes=10, block_size=16))
    nn.init.normal_(gpt.output.weight, std=0.5)
    policy = LlamaGenPolicy(gpt, VQModel(vq_config("tiny")))
    start = {k: v.clone() for k, v in gpt.state_dict().items()}
    loo_fid = LooFidReward(PixelFeatures(), torch.zeros(192), torch.ones(192), ema_beta=0.5)
    train_grpo(policy, {"brightness": (Brightness(), 1.0)}, loo_fid, config(steps=1, batch_classes=2), tmp_path,
               progress=False)
    moved = [k for k, v in gpt.state_dict().items() if not torch.equal(v, start[k])]
    assert "output.weight" in moved and any(k.startswith("layers.") for k in moved)
    assert set(torch.load(tmp_path / "policy.pt", weights_only=True)["model"]) == set(start)  # LlamaGen's layout


def test_frozen_copy_shares_the_tokenizer_not_the_weights():
    policy = TablePolicy()
    ref = policy.frozen_copy()
    assert ref.tokenizer is policy.tokenizer
    assert ref.net.logits is not policy.net.logits and torch.equal(ref.net.logits, policy.net.logits)
    assert not ref.net.logits.requires_grad and not ref.training
    assert "tokenizer" not in dict(policy.named_modules()) and set(policy.state_dict()) == {"net.logits"}


def test_rollout_log_probs_equal_the_teacher_forced_ones_and_conditions_are_checked():
    policy = TablePolicy()
    conditions = torch.tensor([0, 1, 2, 2])
    out = policy.rollout(conditions, SamplingConfig(temperature=0.7), torch.Generator().manual_seed(1))
    logp, entropy = policy(conditions, out.tokens, 0.7)
    torch.testing.assert_close(out.logprobs, logp)
    assert decode_images(policy, out.tokens, batch=3).shape == (4, 3, 2, 2)
    with pytest.raises(ValueError, match=r"condition id 3 out of range \[0, 2\]"):
        policy.rollout(torch.tensor([0, 3]), SamplingConfig())
