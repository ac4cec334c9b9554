"""The realism reward: minus the distance to the k-th nearest real image's features, worked by hand."""

import pytest
import torch

from argrpo.rewards.realism import RealismReward


class Flat:
    def features(self, images):
        return images.flatten(1)


def test_the_reward_is_minus_the_kth_nearest_real_distance():
    real = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    reward = RealismReward(Flat(), real, k=2, chunk=1)
    images = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).view(2, 1, 1, 2)  # features: (0, 0) and (1, 1)
    # (0, 0): distances 0, 1, 2, 7.07 -> 2nd nearest 1; (1, 1): 1.41, 1, 1.41, 5.66 -> 2nd nearest sqrt(2)
    torch.testing.assert_close(reward(images, torch.zeros(2)), torch.tensor([-1.0, -(2**0.5)]))
    far = torch.tensor([[9.0, 9.0]]).view(1, 1, 1, 2)
    assert reward(far, torch.zeros(1)) < reward(images, torch.zeros(2)).min()  # off the data: the lowest score


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="M > k=3"):
        RealismReward(Flat(), torch.zeros(3, 2), k=3)
