import pytest
import torch

from cc_core.errors import ConfigError, UnknownArchitectureError
from cc_core.models import ModelSpec, build_model, count_params, list_models


@pytest.mark.parametrize("arch, expected", [
    ("resnet18", 11_173_962), ("resnet34", 21_282_122), ("mobilenet_v2", 2_236_682)])
def test_paper_parameter_counts_at_width_1(arch, expected):
    assert count_params(build_model(arch, num_classes=10)) == expected


def test_paper_counts_rounded_as_published():
    published = {"resnet18": 11.17e6, "resnet34": 21.28e6, "mobilenet_v2": 2.24e6}
    for arch, count in published.items():
        assert round(count_params(build_model(arch)) / 1e4) * 1e4 == pytest.approx(count)


@pytest.mark.parametrize("arch", list_models())
@pytest.mark.parametrize("num_classes, width", [(10, 0.25), (43, 0.5)])
def test_every_arch_builds_any_classes_and_width(arch, num_classes, width):
    model = build_model(arch, num_classes=num_classes, width=width).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, num_classes)
    assert model.cc_spec.arch == arch and model.cc_spec.width == width
    assert count_params(model) < count_params(build_model(arch, num_classes=num_classes))


def test_width_scales_channels():
    model = build_model("resnet18", width=0.5)
    assert model.conv1.out_channels == 32 and model.linear.in_features == 256


def test_rebuild_from_plain_dict():
    model = build_model("vgg19_bn", num_classes=43, width=0.5, class_names=tuple(str(i) for i in range(43)))
    spec_dict = model.cc_spec.to_dict()
    rebuilt = build_model(**spec_dict)
    assert rebuilt.cc_spec == model.cc_spec
    assert ModelSpec.from_dict(spec_dict) == model.cc_spec
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in model.parameters()]


@pytest.mark.parametrize("alias", ["ResNet-18", "PreAct_ResNet18", "VGG19-BN", "mobilenetv2"])
def test_aliases(alias):
    build_model(alias, width=0.25)


def test_unknown_arch_lists_known_ones():
    with pytest.raises(UnknownArchitectureError, match=r"unknown architecture 'resnet99'; known: .*resnet18"):
        build_model("resnet99")


@pytest.mark.parametrize("kwargs, message", [
    ({"num_classes": 0}, "num_classes must be a positive integer"),
    ({"width": -1.0}, "width must be a number in"),
    ({"num_classes": 3, "class_names": ("a", "b")}, "2 class names given for 3 classes"),
])
def test_bad_build_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        build_model("resnet18", **kwargs)


def test_unknown_spec_field():
    with pytest.raises(ConfigError, match="unknown model spec fields"):
        ModelSpec.from_dict({"arch": "resnet18", "num_classes": 10, "depth": 18})
