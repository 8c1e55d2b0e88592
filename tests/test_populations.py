"""Two populations end to end: labels-file data, per-population export, routing by image and by DICOM age."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dicom_factory import acr_nema_dicom
from pneumoscan.inference import Predictor, read_card

pytestmark = pytest.mark.slow


def test_export_fits_each_population_on_its_own_validation_part(two_population_model: Path) -> None:
    card = read_card(two_population_model)
    assert set(card["populations"]) == {"child", "adult"}
    for population, entry in card["populations"].items():
        assert entry["validation"]["metrics"]["n"] > 0 and entry["test"]["metrics"]["n"] > 0
        assert entry["operating_point"]["policy"] == "sensitivity"
        assert (two_population_model / entry["ood_gate"]["file"]).is_file()
        assert entry["ood_gate"]["file"] == f"ood_gate.{population}.npz"
    adult = card["populations"]["adult"]["test"]["metrics"]
    assert {"AP", "PA", "reversed_view_mix", "view_only_baseline"} <= set(adult["by_view"])
    assert card["populations"]["child"]["test"]["metrics"]["by_view"] is None  # Kermany records no view
    assert (two_population_model / "population.npz").is_file()
    names = [d["name"] for d in card["data"]["datasets"]]
    assert len(names) == 2 and all(len(d["test_patients_sha256"]) == 64 for d in card["data"]["datasets"])
    text = (two_population_model / "MODEL_CARD.md").read_text()
    assert "## Children" in text and "## Adults" in text and "view-only baseline" in text
