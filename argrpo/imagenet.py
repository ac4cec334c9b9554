"""ImageNet-1k class names and the text prompts the CLIP-style rewards score against.

The names come from torchvision's weight metadata, which ships inside the torchvision package, so
they are available offline; index i is ImageNet class id i, the label the generator is conditioned
on.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_TEMPLATE = "a photo of a {name}"


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in class-id order ("tench", "goldfish", ...)."""
    from torchvision.models import ResNet50_Weights

    names = list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])
    if len(names) != 1000:
        raise RuntimeError(f"torchvision's ImageNet metadata lists {len(names)} classes, expected 1000")
    return names


def class_prompts(names: Sequence[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    """One prompt per class: `template` with `{name}` replaced by the class name."""
    if "{name}" not in template:
        raise ValueError(f"prompt template must contain '{{name}}', got {template!r}")
    return [template.format(name=name) for name in names]
