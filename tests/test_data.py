import hashlib
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cc_core.data import (Archive, ChecksumError, DataNotFoundError, ImageData, augment,
                          download_dataset, get_dataset_info, load_dataset, random_crop,
                          random_hflip, resolve_data_dir)
from cc_core.errors import ConfigError, InputError

SHARED = os.environ.get("CC_DATA_DIR")


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("CC_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv("CC_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert resolve_data_dir() == tmp_path / "cache" / "cleancompact" / "data"


def test_missing_data_says_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(DataNotFoundError, match=(
            rf"no cifar10 test data in {tmp_path} \(looked for cifar10_test.npz .*\); download it with "
            rf"`cleancompact download cifar10 --data-dir {tmp_path}`")):
        load_dataset("cifar10", "test", tmp_path)


def test_unknown_dataset():
    with pytest.raises(InputError, match="unknown dataset 'imagenet'; known: cifar10, cifar100, gtsrb"):
        get_dataset_info("imagenet")


def test_npz_shards_are_joined_in_order(tmp_path):
    for k in range(2):
        np.savez(tmp_path / f"cifar10_train_{k}.npz", x=np.full((3, 32, 32, 3), k, np.uint8),
                 y=np.array([k, k, k]), classes=np.array([str(i) for i in range(10)]))
    data = load_dataset("cifar10", "train", tmp_path)
    assert len(data) == 6 and data.y.tolist() == [0, 0, 0, 1, 1, 1] and data.x[5].max() == 1


def test_labels_out_of_range_are_refused():
    with pytest.raises(InputError, match=r"labels of custom must be in \[0, 1\], found 0..2"):
        ImageData(np.zeros((3, 8, 8, 3), np.uint8), np.array([0, 1, 2]), ["a", "b"])


def test_image_folder(tmp_path):
    from PIL import Image

    for cls, value in (("cat", 10), ("dog", 200)):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(np.full((40, 50, 3), value, np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "cat" / "notes.txt").write_text("ignored")
    data = load_dataset(str(tmp_path))
    assert data.classes == ["cat", "dog"] and data.y.tolist() == [0, 0, 1, 1]
    assert data.x.shape == (4, 32, 32, 3) and data.x[3].min() == 200


def test_augmentation_ops():
    x = torch.rand(8, 3, 32, 32)
    assert torch.equal(random_crop(x, 0), x)
    shifted = random_crop(x, 4, torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape
    flipped = random_hflip(x, torch.Generator().manual_seed(0))
    per_sample = [torch.equal(f, s) or torch.equal(f, s.flip(2)) for f, s in zip(flipped, x)]
    assert all(per_sample)
    # one sample's crop is a window of its padded image
    padded = torch.nn.functional.pad(x, (4,) * 4)
    g = torch.Generator().manual_seed(1)
    out = random_crop(x, 4, g)
    assert any(torch.equal(out[0], padded[0, :, i:i + 32, j:j + 32]) for i in range(9) for j in range(9))
    assert augment(x, hflip=False).shape == x.shape


def _fake_cifar10_archive(path: Path) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 12).astype(np.uint8)
    pixels = rng.integers(0, 256, (12, 3072)).astype(np.uint8)
    records = np.concatenate([labels[:, None], pixels], 1)
    with tarfile.open(path, "w:gz") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("batches.meta.txt", "\n".join(["airplane", "automobile", "bird", "cat", "deer", "dog",
                                           "frog", "horse", "ship", "truck"]).encode() + b"\n\n")
        add("data_batch_1.bin", records[:5].tobytes())
        add("data_batch_2.bin", records[5:9].tobytes())
        add("test_batch.bin", records[9:].tobytes())
    return labels, pixels


def test_download_verifies_checksum_and_converts(tmp_path):
    archive = tmp_path / "cifar-10-binary.tar.gz"
    labels, pixels = _fake_cifar10_archive(archive)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    out = download_dataset("cifar10", tmp_path / "data", progress=False,
                           archives={"binary": Archive(archive.as_uri(), md5)})
    train, test = load_dataset("cifar10", "train", out), load_dataset("cifar10", "test", out)
    assert len(train) == 9 and len(test) == 3 and train.classes[9] == "truck"
    assert train.y.tolist() == labels[:9].tolist()
    assert np.array_equal(test.x[0], pixels[9].reshape(3, 32, 32).transpose(1, 2, 0))
    assert not (out / ".downloads").exists()


def test_download_with_wrong_checksum_writes_nothing(tmp_path):
    archive = tmp_path / "cifar-10-binary.tar.gz"
    _fake_cifar10_archive(archive)
    with pytest.raises(ChecksumError, match="has MD5 .*, expected 0+: the download is corrupt"):
        download_dataset("cifar10", tmp_path / "data", progress=False,
                         archives={"binary": Archive(archive.as_uri(), "0" * 32)})
    assert not list((tmp_path / "data").rglob("*.npz"))
    assert not [p for p in (tmp_path / "data").rglob("*") if p.is_file()]


def test_unreachable_download_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot download"):
        download_dataset("cifar10", tmp_path, progress=False,
                         archives={"binary": Archive((tmp_path / "missing.tgz").as_uri(), "0" * 32)})


@pytest.mark.skipif(not SHARED, reason="CC_DATA_DIR not set")
def test_shared_data_loads():
    test = load_dataset("cifar10", "test")
    assert len(test) == 10_000 and test.num_classes == 10 and test.x.dtype == np.uint8
    gtsrb = load_dataset("gtsrb", "train")
    assert gtsrb.num_classes == 43 and len(gtsrb) == 9802


def test_the_test_halves_split_each_class_and_together_are_the_test_set():
    from cc_core.data import test_half

    y = np.repeat(np.arange(4), [10, 11, 6, 1])
    data = ImageData(np.arange(len(y), dtype=np.uint8)[:, None, None, None].repeat(3, 3), y, list("abcd"))
    val, report = test_half(data, "val"), test_half(data, "report")
    ids = lambda d: set(d.x[:, 0, 0, 0].tolist())  # noqa: E731
    assert ids(val).isdisjoint(ids(report)) and ids(val) | ids(report) == set(range(len(y)))
    assert np.bincount(val.y, minlength=4).tolist() == [5, 5, 3, 0]
    assert np.all(np.diff(val.x[:, 0, 0, 0]) > 0)  # the original order
    assert ids(test_half(data, "val")) == ids(val)  # fixed by the seed
    assert ids(test_half(data, "val", seed=1)) != ids(val)
    with pytest.raises(ConfigError, match="a test half is one of val, report"):
        test_half(data, "train")


def test_load_dataset_gives_the_halves_of_the_test_split(tmp_path):
    from cc_core.data import load_dataset as load

    x = np.zeros((20, 32, 32, 3), np.uint8)
    np.savez(tmp_path / "cifar10_test.npz", x=x, y=np.arange(20) % 10, classes=np.array(list("abcdefghij")))
    assert len(load("cifar10", "val", tmp_path)) == 10 and len(load("cifar10", "report", tmp_path)) == 10
    with pytest.raises(ConfigError, match="split must be one of train, test, val, report"):
        load("cifar10", "holdout", tmp_path)


@pytest.fixture()
def archive_server(tmp_path):
    """A local HTTP server serving tmp_path/served/ (the fake CIFAR-10 archive)."""
    import functools
    import http.server
    import threading

    served = tmp_path / "served"
    served.mkdir()
    labels, _ = _fake_cifar10_archive(served / "cifar-10-binary.tar.gz")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/cifar-10-binary.tar.gz", served / "cifar-10-binary.tar.gz", labels
    server.shutdown()


def _serve_as_cifar10(monkeypatch, tmp_path, url: str, md5: str) -> Path:
    import dataclasses

    import cc_core.data

    monkeypatch.delenv("CC_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    info = cc_core.data.DATASETS["cifar10"]
    monkeypatch.setitem(cc_core.data.DATASETS, "cifar10", dataclasses.replace(info, archives={"binary": Archive(url, md5)}))
    return tmp_path / "cache" / "cleancompact" / "data"


def test_first_run_downloads_and_verifies_the_missing_dataset(archive_server, monkeypatch, tmp_path):
    from cc_core.data import ensure_dataset

    url, archive, labels = archive_server
    cache = _serve_as_cifar10(monkeypatch, tmp_path, url, hashlib.md5(archive.read_bytes()).hexdigest())
    test = ensure_dataset("cifar10", "test", progress=False)
    assert len(test) == 3 and test.y.tolist() == labels[9:].tolist()
    assert sorted(p.name for p in cache.glob("*.npz")) == ["cifar10_test.npz", "cifar10_train.npz"]
    archive.unlink()  # a second run finds the data and downloads nothing
    assert len(ensure_dataset("cifar10", "train", progress=False)) == 9
    monkeypatch.setenv("CC_DATA_DIR", str(tmp_path / "elsewhere"))  # a directory the user named is never filled
    with pytest.raises(DataNotFoundError):
        ensure_dataset("cifar10", "test", progress=False)


def test_demo_with_a_corrupt_download_exits_2_and_keeps_nothing(archive_server, monkeypatch, tmp_path, capsys):
    from cleancompact.cli import main

    url, _, _ = archive_server
    cache = _serve_as_cifar10(monkeypatch, tmp_path, url, "0" * 32)
    monkeypatch.setenv("CC_HOME", str(tmp_path / "home"))
    assert main(["demo"]) == 2
    assert "expected 00000000000000000000000000000000" in capsys.readouterr().err
    assert not [p for p in cache.rglob("*") if p.is_file()]
    assert not (tmp_path / "home").exists() or not list((tmp_path / "home").rglob("*.safetensors"))
