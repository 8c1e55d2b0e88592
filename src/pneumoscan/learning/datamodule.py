"""Feeding images to PyTorch: datasets, augmentation and the Lightning DataModule.

Every image goes through :func:`pneumoscan.inputs.preprocessing.normalize` last, the
same function inference uses, so training and serving see identical tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torchvision.transforms import v2

from pneumoscan.config import POPULATIONS, DataConfig
from pneumoscan.inputs.preprocessing import (
    load_grayscale,
    normalize,
    resize_and_normalize_intensity,
)
from pneumoscan.learning.data import (
    Record,
    class_counts,
    class_weights,
    records_of,
    view_balancing_weights,
)

log = logging.getLogger(__name__)

ImageTransform = Callable[[Image.Image], Image.Image]


def train_augmentation(config: DataConfig) -> ImageTransform:
    """Small geometric and photometric changes that a real X-ray could show.

    No horizontal flip unless asked: the heart sits on the left, and a flipped
    chest is not a chest the model will ever see.
    """
    steps: list[object] = [
        lambda image: resize_and_normalize_intensity(image, config.image_size, config.intensity),
        v2.RandomResizedCrop(config.image_size, scale=config.crop_scale, ratio=(0.9, 1.1), antialias=True),
        v2.RandomRotation(config.rotation_degrees),
        v2.ColorJitter(brightness=config.brightness, contrast=config.contrast),
    ]
    if config.strong_photometric:
        steps.append(PhotometricAugment())
    if config.hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


class PhotometricAugment:
    """Exposure, sharpness, noise and compression as they differ between sites and years.

    Each applies with its own probability: gamma 0.7–1.4, Gaussian blur σ ≤ 1.2 px,
    Gaussian noise σ ≤ 0.03 of the range, JPEG re-encoding at quality 40–95. The
    random draws come from torch, so DataLoader workers are seeded by Lightning.
    """

    def __call__(self, image: Image.Image) -> Image.Image:
        import io

        from PIL import ImageFilter

        def draw(low: float, high: float) -> float:
            return low + (high - low) * float(torch.rand(()))

        if torch.rand(()) < 0.5:
            gamma = draw(0.7, 1.4)
            image = image.point([round(255 * (i / 255) ** gamma) for i in range(256)])
        if torch.rand(()) < 0.3:
            image = image.filter(ImageFilter.GaussianBlur(draw(0.3, 1.2)))
        if torch.rand(()) < 0.3:
            noise = torch.randn(image.size[1], image.size[0]).numpy() * draw(0.005, 0.03) * 255
            image = Image.fromarray(np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8))
        if torch.rand(()) < 0.3:
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=int(draw(40, 95)))
            image = Image.open(buffer).convert("L")
        return image


def eval_transform(config: DataConfig) -> ImageTransform:
    """Evaluation: only the resize and intensity normalisation that inference does too."""
    return lambda image: resize_and_normalize_intensity(image, config.image_size, config.intensity)


def population_index(record: Record) -> int:
    """Index of the record's population in ``POPULATIONS`` (-1 when unknown), for per-population validation figures."""
    return POPULATIONS.index(record.population) if record.population in POPULATIONS else -1


class XrayDataset(Dataset):
    """Records -> (``3×H×W`` float tensor, float label, population index) triples."""

    def __init__(self, records: list[Record], transform: ImageTransform):
        self.records = records
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        record = self.records[index]
        image = self.transform(load_grayscale(record.path))
        array = normalize(image)
        return torch.from_numpy(np.ascontiguousarray(array)), torch.tensor(float(record.label)), torch.tensor(population_index(record))


class XrayDataModule(L.LightningDataModule):
    """Patient-level train/validation split of every dataset; no test part is touched here."""

    def __init__(self, config: DataConfig):
        super().__init__()
        self.config = config
        self.train_records: list[Record] = []
        self.val_records: list[Record] = []

    def setup(self, stage: str | None = None) -> None:
        if self.train_records:
            return
        sources, seed, fraction = self.config.sources, self.config.seed, self.config.val_fraction
        self.train_records = records_of(sources, "train", seed, fraction)
        self.val_records = records_of(sources, "val", seed, fraction)
        log.info("train %s, validation %s", class_counts(self.train_records), class_counts(self.val_records))

    @property
    def class_weights(self) -> list[float]:
        self.setup()
        return class_weights(self.train_records)

    def train_dataloader(self) -> DataLoader:
        dataset = XrayDataset(self.train_records, train_augmentation(self.config))
        if self.config.balance_views:
            weights = view_balancing_weights(self.train_records)
            generator = torch.Generator().manual_seed(self.config.seed)
            sampler = WeightedRandomSampler(weights, num_samples=len(weights), replacement=True, generator=generator)
            return self._loader(dataset, shuffle=False, sampler=sampler)
        return self._loader(dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(XrayDataset(self.val_records, eval_transform(self.config)), shuffle=False)

    def _loader(self, dataset: XrayDataset, shuffle: bool, sampler: WeightedRandomSampler | None = None) -> DataLoader:
        workers = self.config.num_workers
        return DataLoader(
            dataset,
            batch_size=self.config.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            drop_last=False,
        )
