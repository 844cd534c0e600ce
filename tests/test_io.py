import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cc_core import build_model, clean_compact, load_model, read_metadata, save_model
from cc_core.errors import (ConfigError, InputError, ModelFileError, ModelFileNotFoundError,
                            NonFiniteWeightsError, StateDictMismatchError, UnknownArchitectureError,
                            UnsafeModelFileError)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("resnet18", num_classes=10, width=0.25,
                    class_names=tuple(f"c{i}" for i in range(10))).eval()
    # non-trivial BN statistics so a lost buffer would show in the logits
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m


@pytest.fixture()
def x():
    return torch.rand(3, 3, 32, 32)


def _state_file(tmp_path: Path, obj, name: str = "m.pt") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_compacted_round_trip_gives_identical_logits(model, x, tmp_path):
    new, plan = clean_compact(model, ratio=3, tau=2.0, rank_multiple=8)
    path = save_model(new, tmp_path / "c.safetensors", plan=plan)
    back = load_model(path)
    with torch.no_grad():
        assert torch.equal(back(x), new(x))
    assert back.cc_spec == new.cc_spec and back.cc_spec.structure == plan.structure
    meta = read_metadata(path)
    assert meta["plan"]["ratio_achieved"] == pytest.approx(plan.ratio_achieved)
    assert meta["spec"]["class_names"][3] == "c3"
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temp file left


def test_state_dict_with_inferred_classes_and_width(tmp_path):
    m = build_model("preactresnet18", num_classes=43, width=0.5).eval()
    back = load_model(_state_file(tmp_path, m.state_dict()), arch="preactresnet18")
    assert (back.cc_spec.num_classes, back.cc_spec.width) == (43, 0.5)
    inp = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(inp), m(inp))


def test_nested_checkpoint_with_dataparallel_prefix(model, x, tmp_path):
    ckpt = {"arch": "resnet18", "epoch": 3,
            "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}
    back = load_model(_state_file(tmp_path, ckpt))
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_plain_safetensors_state_dict(model, x, tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with torch.no_grad():
        assert torch.equal(load_model(path, arch="resnet18")(x), model(x))


class _Exploit:
    """Unpickling this calls Path.touch(marker): code execution from a model file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_payload_is_refused_and_never_runs(model, tmp_path):
    marker = tmp_path / "pwned"
    path = _state_file(tmp_path, {"weights": model.state_dict(), "payload": _Exploit(marker)}, "evil.pt")
    with pytest.raises(UnsafeModelFileError, match=r"refused to load .*evil\.pt: it contains pickled Python objects"):
        load_model(path, arch="resnet18")
    assert not marker.exists()
    # the file is a real exploit: an unsafe load does run it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_whole_module_pickle_needs_explicit_opt_in(model, x, tmp_path):
    path = _state_file(tmp_path, model, "module.pt")
    with pytest.raises(UnsafeModelFileError, match="allow_pickle=True"):
        load_model(path, arch="resnet18")
    with torch.no_grad():
        assert torch.equal(load_model(path, arch="resnet18", allow_pickle=True)(x), model(x))


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileNotFoundError, match="model file not found: .*nope.pt"):
        load_model(tmp_path / "nope.pt", arch="resnet18")


def test_directory(tmp_path):
    with pytest.raises(ModelFileError, match="is a directory, not a model file"):
        load_model(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "e.safetensors").write_bytes(b"")
    with pytest.raises(ModelFileError, match=r"is empty \(0 bytes\)"):
        load_model(tmp_path / "e.safetensors")


def test_not_a_model_file(tmp_path):
    (tmp_path / "notes.pt").write_text("these are not weights\n")
    with pytest.raises(ModelFileError, match="is not a model file: expected a .safetensors file or a PyTorch state dict"):
        load_model(tmp_path / "notes.pt")


def test_truncated_safetensors(model, tmp_path):
    path = save_model(model, tmp_path / "t.safetensors")
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    path.write_bytes(data[: 8 + header_len + 1000])  # header intact, tensors cut
    with pytest.raises(ModelFileError, match="is truncated or corrupt"):
        load_model(path)
    path.write_bytes(data[:200])  # header cut
    with pytest.raises(ModelFileError, match="is truncated: its safetensors header alone needs"):
        load_model(path)


def test_truncated_torch_file(model, tmp_path):
    path = _state_file(tmp_path, model.state_dict())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="is truncated or corrupt: torch.load failed"):
        load_model(path, arch="resnet18")


def test_not_a_state_dict(tmp_path):
    path = _state_file(tmp_path, [torch.zeros(3)])
    with pytest.raises(ModelFileError, match="holds a list, not a state dict"):
        load_model(path, arch="resnet18")
    path = _state_file(tmp_path, {"epoch": 3, "lr": 0.1})
    with pytest.raises(ModelFileError, match="holds a dict without weights"):
        load_model(path, arch="resnet18")


def test_arch_required_for_bare_state_dict(model, tmp_path):
    with pytest.raises(ModelFileError, match=r"does not say which architecture it is: pass arch=\.\.\. \(CLI: --arch\)"):
        load_model(_state_file(tmp_path, model.state_dict()))


def test_unknown_arch(model, tmp_path):
    with pytest.raises(UnknownArchitectureError, match="unknown architecture 'resnet99'; known:"):
        load_model(_state_file(tmp_path, model.state_dict()), arch="resnet99")


def test_missing_and_unexpected_keys(model, tmp_path):
    state = dict(model.state_dict())
    del state["linear.bias"]
    state["extra.weight"] = torch.zeros(2)
    with pytest.raises(StateDictMismatchError,
                       match=r"missing keys \(1\): linear.bias; unexpected keys \(1\): extra.weight\. Is --arch right\?"):
        load_model(_state_file(tmp_path, state), arch="resnet18")


def test_wrong_architecture_lists_keys(model, tmp_path):
    with pytest.raises(StateDictMismatchError, match=r"does not match vgg19_bn .*missing keys \(\d+\): features.0.weight"):
        load_model(_state_file(tmp_path, model.state_dict()), arch="vgg19_bn", num_classes=10)


def test_shape_mismatch(model, tmp_path):
    with pytest.raises(StateDictMismatchError,
                       match=r"shape mismatch for linear.weight: file \(10, 128\) vs model \(100, 128\)"):
        load_model(_state_file(tmp_path, model.state_dict()), arch="resnet18", num_classes=100)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(model, tmp_path, bad):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = bad
    with pytest.raises(NonFiniteWeightsError, match=r"NaN or Inf values in 1 tensors: layer1.0.conv1.weight \(1 of"):
        load_model(_state_file(tmp_path, state), arch="resnet18")


def test_conflicting_arch(model, tmp_path):
    path = save_model(model, tmp_path / "m.safetensors")
    with pytest.raises(ConfigError, match="is a resnet18 but arch='vgg19_bn' was given"):
        load_model(path, arch="vgg19_bn")


def test_corrupt_metadata(model, tmp_path):
    path = tmp_path / "bad-meta.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"format": "cleancompact.model/1", "spec": "{not json"})
    with pytest.raises(ModelFileError, match="corrupt cleancompact metadata"):
        load_model(path)


def test_save_model_input_checks(model, tmp_path):
    with pytest.raises(ConfigError, match="written as .safetensors"):
        save_model(model, tmp_path / "m.pt")
    bare = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="carries no ModelSpec"):
        save_model(bare, tmp_path / "m.safetensors")
    with pytest.raises(ConfigError, match="metadata key 'spec' is reserved"):
        save_model(model, tmp_path / "m.safetensors", metadata={"spec": "x"})
    assert not any(tmp_path.iterdir())


def test_every_load_error_is_an_input_error():
    for cls in (ModelFileError, ModelFileNotFoundError, UnsafeModelFileError, StateDictMismatchError,
                NonFiniteWeightsError, UnknownArchitectureError, ConfigError):
        assert issubclass(cls, InputError) and cls.exit_code == 2


def test_failed_save_leaves_nothing(model, tmp_path, monkeypatch):
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, tmp_path / "m.safetensors")
    assert not any(tmp_path.iterdir())


def test_onnx_export_keeps_the_exporters_noise_off_the_terminal(tmp_path, caplog):
    import logging
    import warnings

    from cc_core.export import export_onnx

    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_onnx(build_model("resnet18", width=0.125), tmp_path / "m.onnx")
    assert not [r for r in caplog.records if r.name.startswith("torch.onnx")]
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert (tmp_path / "m.onnx").stat().st_size > 0
