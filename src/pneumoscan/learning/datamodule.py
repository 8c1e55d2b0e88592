"""Feeding images to PyTorch: datasets, augmentation and the Lightning DataModule.

Every image goes through :func:`pneumoscan.inputs.preprocessing.normalize` last, the
same function inference uses, so training and serving see identical tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torchvision.transforms import v2

from pneumoscan.config import BORDER_ERASE_DEPTHS, POPULATIONS, DataConfig
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
    geometry, photometry = geometric_augmentation(config), photometric_augmentation(config)
    return lambda image: photometry(geometry(resize_and_normalize_intensity(image, config.image_size, config.intensity)))


def geometric_augmentation(config: DataConfig) -> Callable:
    """Crop, rotation (and flip, if asked): applied alike to an image and its box mask when given both."""
    steps: list[object] = [
        v2.RandomResizedCrop(config.image_size, scale=config.crop_scale, ratio=(0.9, 1.1), antialias=True),
        v2.RandomRotation(config.rotation_degrees),
    ]
    if config.hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def photometric_augmentation(config: DataConfig) -> ImageTransform:
    """Brightness and contrast (and gamma, blur, noise, JPEG if asked): the image only."""
    steps: list[object] = [v2.ColorJitter(brightness=config.brightness, contrast=config.contrast)]
    if config.strong_photometric:
        steps.append(PhotometricAugment())
    if config.erase_borders:
        steps.append(BorderErase(config.erase_borders))
    return v2.Compose(steps)


class BorderErase:
    """Blank a strip along each edge of the film, each with probability ``p``, ``BORDER_ERASE_DEPTHS`` of the side deep.

    The edges carry what differs between sites and bedsides rather than lungs: side markers, "PORTABLE"
    stamps, collimation, the table. A model that must do without them now and then cannot lean on them.
    The strip takes a grey drawn between black and the film's median, as collimated edges and burnt-in
    labels do not share one colour. The lungs, and so the radiologists' boxes, lie inside the strips' reach.
    """

    def __init__(self, p: float, depths: tuple[float, float] = BORDER_ERASE_DEPTHS):
        self.p = p
        self.depths = depths

    def __call__(self, image: Image.Image) -> Image.Image:
        array = np.array(image)
        height, width = array.shape
        grey = float(np.median(array))
        for edge in range(4):
            if torch.rand(()) >= self.p:
                continue
            low, high = self.depths
            depth = int((low + (high - low) * float(torch.rand(()))) * (height if edge < 2 else width))
            fill = int(grey * float(torch.rand(())))
            if edge == 0:
                array[:depth] = fill
            elif edge == 1:
                array[height - depth :] = fill
            elif edge == 2:
                array[:, :depth] = fill
            else:
                array[:, width - depth :] = fill
        return Image.fromarray(array)


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
    """Records -> (``3×H×W`` float tensor, float label, population index, ``H×W`` box mask, guided) tuples.

    ``guided`` is 1 for a film whose dataset has radiologists' boxes (a pneumonia with its boxes, or a normal:
    no box anywhere) and 0 for the others, whose mask is empty and means nothing (children's films).
    With ``boxes``, the mask is made at the file's size, then resized, cropped and rotated with the image.
    """

    def __init__(self, records: list[Record], transform: ImageTransform, boxes: dict | None = None, guided_roots: set | None = None,
                 config: DataConfig | None = None, train: bool = False):  # fmt: skip
        self.records = records
        self.transform = transform
        self.boxes = boxes or {}
        self.guided_roots = guided_roots or set()
        self.config = config
        self.train = train

    def __len__(self) -> int:
        return len(self.records)

    def guided(self, record: Record) -> bool:
        if record.label == 1:
            return record.path.resolve() in self.boxes
        return record.root is not None and Path(record.root).resolve() in self.guided_roots

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        record = self.records[index]
        original = load_grayscale(record.path)
        guided = self.guided(record) and self.config is not None
        if guided:
            image, mask = self.with_mask(original, self.boxes.get(record.path.resolve(), []) if record.label == 1 else [])
        else:
            image = self.transform(original)
            mask = torch.zeros(image.size[1], image.size[0])
        array = normalize(image)
        return (torch.from_numpy(np.ascontiguousarray(array)), torch.tensor(float(record.label)), torch.tensor(population_index(record)),
                mask, torch.tensor(float(guided)))  # fmt: skip

    def with_mask(self, original: Image.Image, boxes: list) -> tuple[Image.Image, torch.Tensor]:
        """The image and its boxes' mask through the same resize (and, in training, the same crop and rotation)."""
        from PIL import ImageDraw
        from torchvision import tv_tensors

        config = self.config
        drawn = Image.new("L", original.size, 0)
        for box in boxes:
            ImageDraw.Draw(drawn).rectangle((box.x, box.y, box.x + box.width - 1, box.y + box.height - 1), fill=255)
        image = resize_and_normalize_intensity(original, config.image_size, config.intensity)
        mask = tv_tensors.Mask(torch.from_numpy(np.array(drawn.resize(image.size, Image.Resampling.NEAREST))).float()[None] / 255)
        if self.train:
            image, mask = geometric_augmentation(config)(image, mask)
            image = photometric_augmentation(config)(image)
        return image, mask.as_subclass(torch.Tensor)[0]


def radiologists_boxes(sources: list) -> tuple[dict, set]:
    """Every dataset's ``boxes.csv`` (beside its labels), by image; and the datasets that have one (resolved roots)."""
    from pneumoscan.learning.localisation import boxes_by_dataset

    datasets = boxes_by_dataset(sources)
    return {path: found for boxes in datasets.values() for path, found in boxes.items()}, set(datasets)


class XrayDataModule(L.LightningDataModule):
    """Patient-level train/validation split of every dataset; no test part is touched here."""

    def __init__(self, config: DataConfig):
        super().__init__()
        self.config = config
        self.train_records: list[Record] = []
        self.val_records: list[Record] = []
        self.boxes: dict = {}
        self.guided_roots: set = set()

    def setup(self, stage: str | None = None) -> None:
        if self.train_records:
            return
        sources, seed, fraction = self.config.sources, self.config.seed, self.config.val_fraction
        self.train_records = records_of(sources, "train", seed, fraction)
        self.val_records = records_of(sources, "val", seed, fraction)
        self.boxes, self.guided_roots = radiologists_boxes(sources)
        log.info("train %s, validation %s", class_counts(self.train_records), class_counts(self.val_records))

    @property
    def class_weights(self) -> list[float]:
        self.setup()
        return class_weights(self.train_records)

    def train_dataloader(self) -> DataLoader:
        dataset = XrayDataset(self.train_records, train_augmentation(self.config), self.boxes, self.guided_roots, self.config, train=True)
        if self.config.balance_views:
            weights = view_balancing_weights(self.train_records)
            generator = torch.Generator().manual_seed(self.config.seed)
            sampler = WeightedRandomSampler(weights, num_samples=len(weights), replacement=True, generator=generator)
            return self._loader(dataset, shuffle=False, sampler=sampler)
        return self._loader(dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(XrayDataset(self.val_records, eval_transform(self.config), self.boxes, self.guided_roots, self.config),
                            shuffle=False)  # fmt: skip

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
