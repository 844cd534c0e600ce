"""Model zoo: CIFAR-style classifiers built by name (``build_model("resnet18", 10, 1.0)``)."""
from cc_core.models import mobilenet, resnet, vgg  # noqa: F401  (registers the builders)
from cc_core.models.registry import (
    ArchEntry,
    ModelSpec,
    build_model,
    get_arch,
    list_models,
    register_model,
    scale_channels,
)


def count_params(model) -> int:
    """Number of parameters (buffers such as BN running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


__all__ = ["ArchEntry", "ModelSpec", "build_model", "count_params", "get_arch", "list_models",
           "register_model", "scale_channels"]
