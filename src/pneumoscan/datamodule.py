"""Feeding images to PyTorch: datasets, augmentation and the Lightning DataModule.

Every image goes through :func:`pneumoscan.preprocessing.normalize` last, the
same function inference uses, so training and serving see identical tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from pneumoscan.config import DataConfig
from pneumoscan.data import Record, class_counts, class_weights, list_records, split_by_patient
from pneumoscan.preprocessing import load_grayscale, normalize, resize_square

log = logging.getLogger(__name__)

ImageTransform = Callable[[Image.Image], Image.Image]


def train_augmentation(config: DataConfig) -> ImageTransform:
    """Small geometric and photometric changes that a real X-ray could show.

    No horizontal flip unless asked: the heart sits on the left, and a flipped
    chest is not a chest the model will ever see.
    """
    steps: list[object] = [
        v2.RandomResizedCrop(config.image_size, scale=config.crop_scale, ratio=(0.9, 1.1), antialias=True),
        v2.RandomRotation(config.rotation_degrees),
        v2.ColorJitter(brightness=config.brightness, contrast=config.contrast),
    ]
    if config.hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def eval_transform(config: DataConfig) -> ImageTransform:
    """Evaluation: only the resize that inference does too."""
    return lambda image: resize_square(image, config.image_size)


class XrayDataset(Dataset):
    """Records -> (``3×H×W`` float tensor, float label) pairs."""

    def __init__(self, records: list[Record], transform: ImageTransform):
        self.records = records
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        record = self.records[index]
        image = self.transform(load_grayscale(record.path))
        array = normalize(image)
        return torch.from_numpy(np.ascontiguousarray(array)), torch.tensor(float(record.label))


class XrayDataModule(L.LightningDataModule):
    """Patient-level train/validation split of ``train/``; ``test/`` is not touched here."""

    def __init__(self, config: DataConfig):
        super().__init__()
        self.config = config
        self.train_records: list[Record] = []
        self.val_records: list[Record] = []

    def setup(self, stage: str | None = None) -> None:
        if self.train_records:
            return
        records = list_records(self.config.root, "train")
        self.train_records, self.val_records = split_by_patient(
            records, self.config.val_fraction, self.config.seed
        )
        log.info("train %s, validation %s", class_counts(self.train_records), class_counts(self.val_records))

    @property
    def class_weights(self) -> list[float]:
        self.setup()
        return class_weights(self.train_records)

    def train_dataloader(self) -> DataLoader:
        dataset = XrayDataset(self.train_records, train_augmentation(self.config))
        return self._loader(dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(XrayDataset(self.val_records, eval_transform(self.config)), shuffle=False)

    def _loader(self, dataset: XrayDataset, shuffle: bool) -> DataLoader:
        workers = self.config.num_workers
        return DataLoader(
            dataset,
            batch_size=self.config.batch_size,
            shuffle=shuffle,
            num_workers=workers,
            persistent_workers=workers > 0,
            drop_last=False,
        )
