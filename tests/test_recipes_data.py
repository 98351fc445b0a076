"""Recipes: the CIFAR-10 reader on tiny archives in the real format, the digits set, augmentation."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from recipes.data import (
    CIFAR10_ARCHIVE,
    CIFAR10DataModule,
    DigitsDataModule,
    SyntheticDataModule,
    load_cifar10,
    random_crop_flip,
)

PER_BATCH = 6


def _batch(seed: int, n: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": f"batch {seed}".encode(),
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img{seed}_{i}.png".encode() for i in range(n)],
    }


def make_cifar_archive(folder: Path) -> tuple[Path, dict[str, dict]]:
    """A tar.gz in the exact layout of cifar-10-python.tar.gz, with PER_BATCH images per batch."""
    folder.mkdir(parents=True, exist_ok=True)
    batches = {f"data_batch_{i}": _batch(i, PER_BATCH) for i in range(1, 6)}
    batches["test_batch"] = _batch(99, PER_BATCH)
    meta = {
        b"label_names": [f"class{i}".encode() for i in range(10)],
        b"num_cases_per_batch": PER_BATCH,
        b"num_vis": 3072,
    }
    path = folder / CIFAR10_ARCHIVE
    with tarfile.open(path, "w:gz") as tar:
        for name, content in [*batches.items(), ("batches.meta", meta)]:
            data = pickle.dumps(content, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path, batches


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_cifar_archive_is_checked_extracted_and_read(tmp_path):
    archive, batches = make_cifar_archive(tmp_path)
    train_x, train_y, test_x, test_y = load_cifar10(
        tmp_path, download=False, archive_md5=md5(archive), batch_md5={}
    )
    assert (tmp_path / "cifar-10-batches-py" / "data_batch_5").is_file()
    assert train_x.shape == (5 * PER_BATCH, 3, 32, 32) and train_x.dtype == torch.uint8
    assert test_x.shape == (PER_BATCH, 3, 32, 32)
    expected = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)]).reshape(
        -1, 3, 32, 32
    )
    assert torch.equal(train_x, torch.from_numpy(expected))
    assert train_y.tolist() == sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert test_y.tolist() == batches["test_batch"][b"labels"]
    # A second read uses the extracted folder, even once the archive is gone.
    archive.unlink()
    again = load_cifar10(tmp_path, download=False, archive_md5=None, batch_md5={})
    assert torch.equal(again[0], train_x)


def test_corrupted_archive_fails_with_a_clear_message(tmp_path):
    archive, _ = make_cifar_archive(tmp_path)
    good = md5(archive)
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=r"md5 .* expected .*corrupted.*cifar-10-python.tar.gz"):
        load_cifar10(tmp_path, download=False, archive_md5=good)
    assert not (tmp_path / "cifar-10-batches-py").exists()
    # Without a checksum, the damage is found while reading the archive.
    archive.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(RuntimeError, match="corrupted"):
        load_cifar10(tmp_path, download=False, archive_md5=None)
    assert not (tmp_path / "cifar-10-batches-py").exists()


def test_official_checksums_reject_other_files(tmp_path):
    archive, _ = make_cifar_archive(tmp_path)
    with pytest.raises(RuntimeError, match="c58f30108f718f92721af3b95e74349a"):
        load_cifar10(tmp_path, download=False)  # official archive md5 by default
    load_cifar10(tmp_path, download=False, archive_md5=None, batch_md5={})
    with pytest.raises(RuntimeError, match="data_batch_1 does not have its official md5"):
        load_cifar10(tmp_path, download=False)  # official per-batch md5 by default


def test_missing_data_says_where_to_put_the_archive(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Put the CIFAR-10 python archive cifar-10-python.tar.gz"):
        load_cifar10(tmp_path / "nowhere", download=False)
    bad_url = (tmp_path / "no_such_file.tar.gz").as_uri()
    with pytest.raises(FileNotFoundError, match=rf"downloading {bad_url} failed.*Put the CIFAR-10"):
        load_cifar10(tmp_path / "offline", download=True, url=bad_url)
    assert not list((tmp_path / "offline").iterdir())  # no partial download left


def test_download_fetches_checks_and_extracts(tmp_path):
    archive, batches = make_cifar_archive(tmp_path / "server")
    root = tmp_path / "data"
    train_x, *_ = load_cifar10(
        root, download=True, url=archive.as_uri(), archive_md5=md5(archive), batch_md5={}
    )
    assert (root / CIFAR10_ARCHIVE).is_file() and train_x.shape[0] == 5 * PER_BATCH
    with pytest.raises(RuntimeError, match="does not have md5"):
        load_cifar10(tmp_path / "other", download=True, url=archive.as_uri(), archive_md5="0" * 32)
    assert not list((tmp_path / "other").glob("*.part"))


def test_cifar_datamodule_normalises_and_augments(tmp_path):
    archive, _ = make_cifar_archive(tmp_path)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), batch_size=4, download=False, archive_md5=md5(archive))
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 5 * PER_BATCH and len(dm.val_set) == PER_BATCH
    x, y = next(iter(dm.val_dataloader()))
    x, _ = dm.on_after_batch_transfer((x, y), 0)
    assert x.dtype == torch.float32 and x.shape == (4, 3, 32, 32)
    raw = dm.val_set.tensors[0][:4].float() / 255
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (raw - mean) / std)
    with pytest.raises(ValueError, match="subset"):
        CIFAR10DataModule(subset=-1)


def test_random_crop_flip_takes_crops_of_the_padded_image():
    torch.manual_seed(0)
    images = torch.randn(64, 3, 8, 8)
    out = random_crop_flip(images, padding=2)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    flips = 0
    for i in range(64):
        matches = [
            (dy, dx, f)
            for dy in range(5)
            for dx in range(5)
            for f in (False, True)
            if torch.equal(
                out[i],
                (
                    padded[i, :, dy : dy + 8, dx : dx + 8].flip(-1)
                    if f
                    else padded[i, :, dy : dy + 8, dx : dx + 8]
                ),
            )
        ]
        assert matches, f"image {i} is not a crop of its padded original"
        flips += matches[0][2]
    assert 10 < flips < 54  # about half are flipped
    # a generator makes it reproducible; without padding every image is itself or its mirror
    again = random_crop_flip(images, padding=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, random_crop_flip(images, padding=2, generator=torch.Generator().manual_seed(1)))
    unpadded = random_crop_flip(images, padding=0)
    assert all(torch.equal(u, x) or torch.equal(u, x.flip(-1)) for u, x in zip(unpadded, images))


def test_digits_split_is_stratified_and_standardised():
    dm = DigitsDataModule(batch_size=16)
    dm.setup("fit")
    train_y, val_y = dm.train_set.tensors[1], dm.val_set.tensors[1]
    assert len(train_y) + len(val_y) == 1797
    assert len(val_y) == 359
    # every class keeps about 20% of its images for validation
    for c in range(10):
        share = (val_y == c).sum().item() / ((val_y == c).sum().item() + (train_y == c).sum().item())
        assert 0.18 < share < 0.22
    x, y = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert x.shape == (16, 1, 8, 8)
    all_x = (dm.train_set.tensors[0] - dm.mean) / dm.std
    assert abs(all_x.mean().item()) < 1e-5 and abs(all_x.std().item() - 1) < 1e-4
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        DigitsDataModule(batch_size=0)


def test_synthetic_data_is_reproducible_and_learnable():
    a, b = SyntheticDataModule(num_samples=64, seed=3), SyntheticDataModule(num_samples=64, seed=3)
    a.setup(), b.setup()
    assert torch.equal(a.train_set.tensors[0], b.train_set.tensors[0])
    x, y = a.train_set.tensors
    # nearest class mean classifies most training images: the classes are separable
    means = torch.stack([x[y == c].mean(0) for c in range(10) if (y == c).any()])
    classes = torch.tensor([c for c in range(10) if (y == c).any()])
    pred = classes[torch.cdist(x.flatten(1), means.flatten(1)).argmin(1)]
    assert (pred == y).float().mean() > 0.9
