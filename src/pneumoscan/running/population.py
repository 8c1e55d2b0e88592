"""Whose chest is it: a child's or an adult's, from the image and, for DICOM, from PatientAge.

A figure holds for the population it was measured on, so every prediction is
routed to its population's temperature, threshold and gate. The image decides
through a logistic regression on the model's pooled features (the ``embedding``
output, what the classifier head sees), fitted on the training parts of both
populations and stored beside the model as ``population.npz``. A DICOM's
``PatientAge``, when present, is the stated fact and decides; when it and the
image disagree, the prediction says so.

Applying needs NumPy only; fitting needs scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumoscan.config import ADULT_AGE, POPULATIONS

POPULATION_FILE = "population.npz"
BY_IMAGE = "image"
BY_AGE = "DICOM PatientAge"
BY_MODEL = "the model's only population"


@dataclass
class PopulationClassifier:
    """Child (0) vs adult (1) from the embedding: standardise, then one linear layer."""

    mean: np.ndarray  # (C,)
    scale: np.ndarray  # (C,)
    coef: np.ndarray  # (C,)
    intercept: float

    def adult_probability(self, embeddings: np.ndarray) -> np.ndarray:
        z = (np.asarray(embeddings, np.float64).reshape(len(embeddings), -1) - self.mean) / self.scale
        return 0.5 * (1.0 + np.tanh(0.5 * (z @ self.coef + self.intercept)))

    def predict(self, embeddings: np.ndarray) -> list[str]:
        return [POPULATIONS[int(p >= 0.5)] for p in self.adult_probability(embeddings)]

    def save(self, model_dir: Path) -> Path:
        path = Path(model_dir) / POPULATION_FILE
        np.savez_compressed(path, mean=self.mean, scale=self.scale, coef=self.coef, intercept=np.float64(self.intercept))
        return path

    @classmethod
    def load(cls, model_dir: Path) -> PopulationClassifier | None:
        path = Path(model_dir) / POPULATION_FILE
        if not path.is_file():
            return None
        with np.load(path) as data:
            return cls(data["mean"], data["scale"], data["coef"], float(data["intercept"]))


def fit_population_classifier(embeddings: np.ndarray, populations: list[str]) -> PopulationClassifier:
    """Logistic regression (scikit-learn defaults) on standardised embeddings of the training parts."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(embeddings, np.float64)
    y = np.asarray([POPULATIONS.index(p) for p in populations])
    scaler = StandardScaler().fit(x)
    model = LogisticRegression(max_iter=2000).fit(scaler.transform(x), y)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    return PopulationClassifier(scaler.mean_, scale, model.coef_[0], float(model.intercept_[0]))


def population_of_age(age_years: float | None) -> str | None:
    if age_years is None:
        return None
    return POPULATIONS[int(age_years >= ADULT_AGE)]


@dataclass(frozen=True)
class PopulationDecision:
    """The population a prediction is routed to, what decided it, and any disagreement."""

    population: str
    source: str  # BY_IMAGE, BY_AGE or BY_MODEL
    image_population: str | None = None
    note: str | None = None


def decide_population(image_population: str | None, age_years: float | None, only: str | None = None) -> PopulationDecision:
    """The stated age wins over the image's look; a model with one population answers for that one only."""
    if only is not None:
        return PopulationDecision(only, BY_MODEL, image_population)
    from_age = population_of_age(age_years)
    if from_age is None:
        return PopulationDecision(str(image_population), BY_IMAGE, image_population)
    note = None
    if image_population is not None and image_population != from_age:
        note = (
            f"the image looks like {_article(image_population)}'s chest X-ray, but the DICOM PatientAge says {from_age}: "
            f"the {from_age} operating point is used"
        )
    return PopulationDecision(from_age, BY_AGE, image_population, note)


def _article(population: str) -> str:
    return f"an {population}" if population[0] in "aeiou" else f"a {population}"
