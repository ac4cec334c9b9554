"""LOO-FID on the LOO-FID paper's reward network: torchvision's Inception-v3 read from a local file."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.inception import Inception3

from argrpo.checkpoints import CheckpointError
from argrpo.features import TorchvisionInceptionFeatures


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = Inception3(num_classes=1000, aux_logits=True, transform_input=False, init_weights=False).eval()
    path = tmp_path_factory.mktemp("w") / "inception_v3_google.pth"
    torch.save(model.state_dict(), path)  # the layout torchvision's IMAGENET1K_V1 file has
    return path, model


def test_features_are_the_avgpool_output_after_the_papers_preprocessing(weights, offline):
    path, model = weights
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    ours, probs = TorchvisionInceptionFeatures(str(path), batch_size=2).features_and_probs(images)
    # by hand: [-1, 1] -> uint8 by truncation -> [0, 1] -> bilinear antialiased 299 -> ImageNet mean / std
    x = ((images * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8).float() / 255
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    pooled = []
    hook = model.avgpool.register_forward_hook(lambda m, i, o: pooled.append(o.flatten(1)))
    with torch.no_grad():
        logits = model(x)
    hook.remove()
    assert ours.shape == (3, 2048) and probs.shape == (3, 1000)
    torch.testing.assert_close(ours, pooled[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probs, logits.softmax(-1), rtol=1e-5, atol=1e-6)


def test_a_file_of_another_network_is_refused_naming_it(tmp_path):
    path = tmp_path / "not_inception.pth"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(CheckpointError, match="not_inception.pth"):
        TorchvisionInceptionFeatures(str(path))
