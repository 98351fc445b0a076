"""Data modules of the recipes: CIFAR-10, the 8x8 digits of scikit-learn, and synthetic images.

All three hold their whole data set as tensors (uint8 images for CIFAR-10), shard it across
ranks (training: Lightning's ``DistributedSampler``, one disjoint shard per rank and epoch;
validation and test: an unrepeated sampler, so that every sample is counted exactly once), and do the
per-batch work with torch ops after the batch reached its device: conversion to float,
normalisation and, for CIFAR-10 training batches, random crops with zero padding and horizontal
flips.  torchvision is not needed.

CIFAR-10 comes from the standard python archive (``cifar-10-python.tar.gz``, the pickled batches
of https://www.cs.toronto.edu/~kriz/cifar.html) in a local folder:

1. ``<data_dir>/cifar-10-batches-py/`` (extracted): each batch file is checked against its
   official md5 and read.
2. else ``<data_dir>/cifar-10-python.tar.gz``: its md5 is checked, then it is extracted.
3. else, with ``download=True``, the archive is fetched with ``urllib`` and checked; when that
   fails (offline machine) the error says where to put the archive.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, TensorDataset

from ec_hooks.validation import check_int

__all__ = [
    "CIFAR10_ARCHIVE",
    "CIFAR10_ARCHIVE_MD5",
    "CIFAR10_BATCH_MD5",
    "CIFAR10_URL",
    "CIFAR10DataModule",
    "DigitsDataModule",
    "SyntheticDataModule",
    "TensorDataModule",
    "load_cifar10",
    "prepare_cifar10",
    "random_crop_flip",
]

logger = logging.getLogger(__name__)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_BATCH_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
# Per-channel statistics of the CIFAR-10 training set (0-1 scale).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _where_to_put(root: Path) -> str:
    return (
        f"Put the CIFAR-10 python archive {CIFAR10_ARCHIVE} (md5 {CIFAR10_ARCHIVE_MD5}, from {CIFAR10_URL}) "
        f"into {root}/, or its extracted folder as {root / CIFAR10_FOLDER}/"
    )


def _download(root: Path, url: str, md5: str | None, timeout: float) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    target = root / CIFAR10_ARCHIVE
    logger.info("downloading %s to %s", url, target)
    handle, name = tempfile.mkstemp(dir=root, prefix=CIFAR10_ARCHIVE, suffix=".part")
    os.close(handle)
    partial = Path(name)
    try:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as exc:  # URLError, timeouts, refused or broken connections are all OSErrors
            raise FileNotFoundError(
                f"CIFAR-10 is not in {root} and downloading {url} failed ({exc}). {_where_to_put(root)}"
            ) from exc
        if md5 is not None and _md5(partial) != md5:
            raise RuntimeError(
                f"the download of {url} does not have md5 {md5} (truncated or altered); try "
                f"again. {_where_to_put(root)}"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)  # nothing half-downloaded is left behind
    return target


def _extract(archive: Path, root: Path, md5: str | None) -> None:
    if md5 is not None:
        actual = _md5(archive)
        if actual != md5:
            raise RuntimeError(
                f"{archive} has md5 {actual}, expected {md5}: the archive is corrupted or not the CIFAR-10 "
                f"python version. Delete it and download it again. {_where_to_put(root)}"
            )
    try:
        with tarfile.open(archive, "r:gz") as tar:
            names = set(tar.getnames())
            missing = [n for n in (*_TRAIN_BATCHES, "test_batch") if f"{CIFAR10_FOLDER}/{n}" not in names]
            if missing:
                raise RuntimeError(
                    f"{archive} does not hold {CIFAR10_FOLDER}/{missing[0]}: not the CIFAR-10 "
                    f"python archive. {_where_to_put(root)}"
                )
            _extract_atomically(tar, root)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise RuntimeError(
            f"cannot read {archive} ({exc}): the archive is corrupted. Delete it and download it "
            f"again. {_where_to_put(root)}"
        ) from exc


def _extract_atomically(tar: tarfile.TarFile, root: Path) -> None:
    """Extract the batches into ``root/cifar-10-batches-py`` so that no process sees it half-written.

    Several processes (the ranks of a node, or nodes sharing a filesystem) may extract at once:

    1. each extracts into its own temporary folder beside the target (same filesystem);
    2. it renames its ``cifar-10-batches-py`` into place, atomically: readers see no folder or a
       whole one;
    3. a process whose rename finds the folder there already (another one won) keeps the
       winner's, which holds the same files, and deletes its own copy.
    """
    target = root / CIFAR10_FOLDER
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{CIFAR10_FOLDER}.") as tmp:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(tmp, filter="data")
        else:  # Python < 3.10.12 has no extraction filters: extract only the batch files
            tar.extractall(
                tmp,
                members=[
                    m
                    for m in tar.getmembers()
                    if m.isfile() and m.name.startswith(f"{CIFAR10_FOLDER}/") and ".." not in m.name
                ],
            )
        try:
            os.rename(Path(tmp) / CIFAR10_FOLDER, target)
        except OSError as exc:
            # rename(2) onto an existing non-empty folder fails (ENOTEMPTY or EEXIST): another
            # process got there first.  Any other failure, or no folder there, is an error.
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not target.is_dir():
                raise
            logger.info("%s was extracted by another process meanwhile; using it", target)


def _read_batch(path: Path, md5: str | None) -> tuple[np.ndarray, np.ndarray]:
    if md5 is not None and _md5(path) != md5:
        raise RuntimeError(
            f"{path} does not have its official md5 {md5}: the file is corrupted. Delete "
            f"{path.parent} and extract the archive again."
        )
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        data = np.asarray(entry[b"data"], dtype=np.uint8)
        labels = np.asarray(entry[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
        raise RuntimeError(f"{path} is not a CIFAR-10 batch ({type(exc).__name__}: {exc})") from exc
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise RuntimeError(
            f"{path}: expected data of shape (N, 3072) and N labels, got {data.shape} and {len(labels)}"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise RuntimeError(f"{path}: labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def prepare_cifar10(
    root: str | os.PathLike,
    download: bool = True,
    archive_md5: str | None = CIFAR10_ARCHIVE_MD5,
    url: str = CIFAR10_URL,
    timeout: float = 60.0,
) -> Path:
    """Make sure ``root/cifar-10-batches-py/`` exists (extract or download the archive); return it."""
    root = Path(root).expanduser()
    folder = root / CIFAR10_FOLDER
    if not folder.is_dir():
        archive = root / CIFAR10_ARCHIVE
        if not archive.is_file():
            if not download:
                raise FileNotFoundError(
                    f"CIFAR-10 is not in {root} and download=False. {_where_to_put(root)}"
                )
            archive = _download(root, url, archive_md5, timeout)
        _extract(archive, root, archive_md5)
    return folder


def load_cifar10(
    root: str | os.PathLike,
    download: bool = True,
    archive_md5: str | None = CIFAR10_ARCHIVE_MD5,
    batch_md5: dict[str, str] | None = None,
    url: str = CIFAR10_URL,
    timeout: float = 60.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read CIFAR-10 from ``root``: ``(train_images, train_labels, test_images, test_labels)``.

    Images are uint8 tensors of shape ``(N, 3, 32, 32)``, labels int64.  ``archive_md5`` and
    ``batch_md5`` default to the official checksums (``batch_md5=None`` means the official ones;
    pass ``{}`` to skip the per-file check); ``archive_md5=None`` skips the archive check.
    """
    folder = prepare_cifar10(root, download, archive_md5, url, timeout)
    batch_md5 = CIFAR10_BATCH_MD5 if batch_md5 is None else batch_md5
    parts = []
    for name in (*_TRAIN_BATCHES, "test_batch"):
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: the extracted folder is incomplete. Delete {folder}. "
                f"{_where_to_put(Path(root).expanduser())}"
            )
        parts.append(_read_batch(path, batch_md5.get(name)))
    train_x = torch.from_numpy(np.concatenate([p[0] for p in parts[:-1]]))
    train_y = torch.from_numpy(np.concatenate([p[1] for p in parts[:-1]]))
    return train_x, train_y, torch.from_numpy(parts[-1][0]), torch.from_numpy(parts[-1][1])


def random_crop_flip(
    images: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crops of the zero-padded images (same size as the input) and random horizontal flips.

    One crop offset and one flip coin per image, drawn from ``generator`` (default: the global RNG,
    so ``seed_everything`` makes runs reproducible); all images of the batch in one gather.
    """
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    dev = images.device
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(dev)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(dev)
    flip = torch.rand(n, generator=generator).to(dev) < 0.5
    cols = torch.arange(w, device=dev)
    cols = (
        torch.where(flip[:, None], cols.flip(0), cols) + ox[:, None]
    )  # flipping = reading columns backwards
    rows = torch.arange(h, device=dev) + oy[:, None]
    batch = torch.arange(n, device=dev)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=dev)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


class TensorDataModule(pl.LightningDataModule):
    """A data module over in-memory tensors; subclasses fill ``self.train_set`` / ``self.val_set``.

    Attributes used by the training entry point: ``num_classes``, ``in_channels``, ``image_size``.
    Per-batch preprocessing: images ``x`` become ``(x / scale - mean) / std`` in float32.
    """

    num_classes: int = 10
    in_channels: int = 1
    image_size: int = 8

    def __init__(self, batch_size: int = 32, num_workers: int = 0) -> None:
        super().__init__()
        check_int("batch_size", batch_size, 1)
        check_int("num_workers", num_workers, 0)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.scale = 1.0
        self.mean = torch.zeros(1)
        self.std = torch.ones(1)

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=shuffle,
        )

    def _eval_loader(self, dataset) -> DataLoader:
        """Every sample on exactly one rank, none repeated.

        Lightning's ``DistributedSampler`` pads the set to a multiple of the world size with
        repeated samples (359 digits on 4 ranks: 360), which the metrics would count twice.
        Lightning keeps a sampler that is a ``DistributedSampler`` already, so this one stays.  The
        ranks may then run one batch more or less than each other, which nothing in evaluation
        waits on: the logged metrics are reduced once, at the end of the epoch (torchmetrics'
        ``compute``, ``self.log(..., sync_dist=True)`` with ``on_epoch``), DDP syncs its buffers on
        the first batch only, and the gossip strategies average the model in
        ``on_validation_start``, before any batch.  Every rank needs one sample at least.
        """
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run")
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size == 1:
            return self._loader(dataset, shuffle=False)
        num_replicas = trainer.world_size
        if len(dataset) < num_replicas:
            raise ValueError(
                f"the evaluation set has {len(dataset)} samples, fewer than the {num_replicas} ranks: "
                "every rank needs one at least"
            )
        sampler = UnrepeatedDistributedSampler(
            dataset, num_replicas=num_replicas, rank=trainer.global_rank, shuffle=False
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """Training-time augmentation of normalised float images (none by default)."""
        return images

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels = batch
        view = (1, -1, 1, 1)
        images = images.float().div_(self.scale)
        images = (images - self.mean.to(images.device).view(view)) / self.std.to(images.device).view(view)
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            images = self.augment(images)
        return images, labels


class CIFAR10DataModule(TensorDataModule):
    """CIFAR-10 (50,000 training images, 10,000 test images used for validation).

    Args:
        data_dir: the folder that holds ``cifar-10-python.tar.gz`` or ``cifar-10-batches-py/``.
        download: fetch the archive when it is not there (needs network).
        augment: random crop with 4 pixels of zero padding and horizontal flip for training.
        batch_size: per rank.
        subset: use only the first ``subset`` training and test images (quick runs); 0 = all.
        archive_md5: expected md5 of the archive (official by default; ``None`` skips).
    """

    num_classes = 10
    in_channels = 3
    image_size = 32

    def __init__(
        self,
        data_dir: str = "data/cifar10",
        batch_size: int = 128,
        num_workers: int = 0,
        download: bool = True,
        augment: bool = True,
        subset: int = 0,
        archive_md5: str | None = CIFAR10_ARCHIVE_MD5,
    ) -> None:
        super().__init__(batch_size, num_workers)
        check_int("subset", subset, 0)  # 0: the whole set
        self.data_dir = data_dir
        self.download = download
        self.use_augmentation = augment
        self.subset = subset
        self.archive_md5 = archive_md5
        self.scale = 255.0
        self.mean = torch.tensor(CIFAR10_MEAN)
        self.std = torch.tensor(CIFAR10_STD)

    def prepare_data(self) -> None:
        # Runs on one process per node: download and extract once, before the ranks read.
        prepare_cifar10(self.data_dir, download=self.download, archive_md5=self.archive_md5)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_x, train_y, test_x, test_y = load_cifar10(
            self.data_dir,
            download=False,
            archive_md5=self.archive_md5,
            batch_md5=None if self.archive_md5 == CIFAR10_ARCHIVE_MD5 else {},
        )
        if self.subset:
            train_x, train_y, test_x, test_y = (
                train_x[: self.subset],
                train_y[: self.subset],
                test_x[: self.subset],
                test_y[: self.subset],
            )
        self.train_set = TensorDataset(train_x, train_y)
        self.val_set = TensorDataset(test_x, test_y)

    def augment(self, images):
        return random_crop_flip(images, padding=4) if self.use_augmentation else images


class DigitsDataModule(TensorDataModule):
    """The 8x8 handwritten digits shipped inside scikit-learn (1,797 images, 10 classes; offline).

    A stratified split, fixed by ``split_seed``, keeps ``val_fraction`` of every class for
    validation (by default 1,438 training and 359 validation images).  Pixels (0..16) are
    standardised with the mean and standard deviation of the training split.
    """

    num_classes = 10
    in_channels = 1
    image_size = 8

    def __init__(
        self, batch_size: int = 32, num_workers: int = 0, val_fraction: float = 0.2, split_seed: int = 0
    ) -> None:
        super().__init__(batch_size, num_workers)
        if not (isinstance(val_fraction, (int, float)) and 0.0 < val_fraction < 1.0):
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        self.val_fraction = float(val_fraction)
        self.split_seed = split_seed

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1)
        labels = torch.as_tensor(digits.target, dtype=torch.int64)
        generator = torch.Generator().manual_seed(self.split_seed)
        train_parts, val_parts = [], []
        for c in range(self.num_classes):
            members = torch.nonzero(labels == c).flatten()
            members = members[torch.randperm(len(members), generator=generator)]
            n_val = round(self.val_fraction * len(members))
            val_parts.append(members[:n_val])
            train_parts.append(members[n_val:])
        train_idx, val_idx = torch.cat(train_parts).sort().values, torch.cat(val_parts).sort().values
        self.mean = images[train_idx].mean().reshape(1)
        self.std = images[train_idx].std().reshape(1)
        self.train_set = TensorDataset(images[train_idx], labels[train_idx])
        self.val_set = TensorDataset(images[val_idx], labels[val_idx])


class SyntheticDataModule(TensorDataModule):
    """Random images whose class sets their mean: learnable, instant, for smoke tests.

    Image ``i`` of class ``y`` is ``prototype[y] + noise * N(0, 1)``, with Gaussian prototypes;
    everything is drawn from a generator seeded by ``seed``.
    """

    def __init__(
        self,
        num_samples: int = 256,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 8,
        noise: float = 1.0,
        batch_size: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, 0)
        for name, value in (
            ("num_samples", num_samples),
            ("num_classes", num_classes),
            ("in_channels", in_channels),
            ("image_size", image_size),
        ):
            check_int(name, value, 1)
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = image_size
        self.noise = noise
        self.seed = seed

    def _draw(self, generator, prototypes, n):
        labels = torch.randint(0, self.num_classes, (n,), generator=generator)
        images = prototypes[labels] + self.noise * torch.randn(n, *prototypes.shape[1:], generator=generator)
        return TensorDataset(images, labels)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        generator = torch.Generator().manual_seed(self.seed)
        shape = (self.num_classes, self.in_channels, self.image_size, self.image_size)
        prototypes = torch.randn(shape, generator=generator)
        self.train_set = self._draw(generator, prototypes, self.num_samples)
        self.val_set = self._draw(generator, prototypes, max(self.num_samples // 4, self.batch_size))
