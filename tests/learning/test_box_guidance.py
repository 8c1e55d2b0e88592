"""Box-guided training (issue 29, item 1): the loss on hand-made maps, the masks the data module makes, and a run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumoscan.config import DataConfig, TrainConfig
from pneumoscan.errors import ConfigurationError
from pneumoscan.learning.datamodule import BorderErase, XrayDataModule, XrayDataset, eval_transform
from pneumoscan.learning.training import PneumoniaClassifier, box_guided_loss, fit, pointing_hits, read_history


def left_half_mask(n: int = 1, size: int = 224) -> torch.Tensor:
    mask = torch.zeros(n, size, size)
    mask[:, :, : size // 2] = 1.0
    return mask


def test_a_map_inside_the_boxes_costs_less_than_one_outside() -> None:
    inside, outside = torch.full((1, 7, 7), -4.0), torch.full((1, 7, 7), -4.0)
    inside[:, :, :3] = 4.0  # the left cells, where the box is
    outside[:, :, 4:] = 4.0
    guided = torch.ones(1)
    assert box_guided_loss(inside, left_half_mask(), guided) < box_guided_loss(outside, left_half_mask(), guided)


def test_on_a_normal_film_any_hot_cell_costs_and_unguided_films_add_nothing() -> None:
    empty = torch.zeros(1, 224, 224)
    cold, hot = torch.full((1, 7, 7), -4.0), torch.full((1, 7, 7), -4.0)
    hot[0, 3, 3] = 4.0
    assert box_guided_loss(cold, empty, torch.ones(1)) < box_guided_loss(hot, empty, torch.ones(1))
    both = torch.cat([cold, hot])  # the second film is a child's: whatever its map, the loss is the first one's
    assert box_guided_loss(both, torch.cat([empty, empty]), torch.tensor([1.0, 0.0])) == box_guided_loss(cold, empty, torch.ones(1))
    assert box_guided_loss(hot, empty, torch.zeros(1)) == 0.0


def test_the_pointing_game_of_a_batch() -> None:
    maps = torch.zeros(3, 7, 7)
    maps[0, 3, 1] = 1.0  # inside the left half
    maps[1, 3, 5] = 1.0  # outside
    maps[2, 3, 1] = 1.0  # a film without boxes: not counted
    assert pointing_hits(maps, left_half_mask(3), torch.tensor([1.0, 1.0, 0.0])) == (1, 2)


def test_a_model_without_a_linear_head_is_refused_box_guidance() -> None:
    with pytest.raises(ConfigurationError, match="box_loss_weight"):
        PneumoniaClassifier(arch="simple_cnn", pretrained=False, box_loss_weight=1.0)


def test_border_erase_blanks_edges_only() -> None:
    from PIL import Image

    torch.manual_seed(0)
    film = Image.fromarray(np.full((100, 100), 200, dtype=np.uint8))
    erased = np.asarray(BorderErase(1.0)(film))
    assert (erased[40:60, 40:60] == 200).all() and (erased[0] != 200).all() and (erased[:, -1] != 200).all()


@pytest.fixture(scope="module")
def boxed_adults(small_adult_root: Path, adult_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small adult set (its labels and image links) with the radiologists' boxes of its films beside its labels."""
    root = tmp_path_factory.mktemp("boxed_adults")
    (root / "images").symlink_to(small_adult_root / "images")
    (root / "labels.csv").write_text((small_adult_root / "labels.csv").read_text())
    names = {Path(row["path"]).name for row in csv.DictReader(open(small_adult_root / "labels.csv"))}
    with open(adult_root / "boxes.csv") as source, open(root / "boxes.csv", "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["path", "x", "y", "width", "height"])
        for row in csv.DictReader(source):
            if Path(row["path"]).name in names:
                writer.writerow([f"images/{Path(row['path']).name}", row["x"], row["y"], row["width"], row["height"]])
    return root


def test_the_data_module_gives_each_film_its_mask(boxed_adults: Path, data_root: Path) -> None:
    config = DataConfig(root=(data_root, boxed_adults), num_workers=0)
    module = XrayDataModule(config)
    module.setup()
    pick = {"boxed": next(r for r in module.train_records if r.path.resolve() in module.boxes),
            "normal": next(r for r in module.train_records if r.population == "adult" and r.label == 0),
            "child": next(r for r in module.train_records if r.population == "child")}  # fmt: skip
    dataset = XrayDataset(list(pick.values()), eval_transform(config), module.boxes, module.guided_roots, config)
    (_, _, _, boxed_mask, boxed_guided), (_, _, _, normal_mask, normal_guided), (_, _, _, child_mask, child_guided) = (
        dataset[i] for i in range(3))  # fmt: skip
    assert boxed_guided == normal_guided == 1 and child_guided == 0
    assert normal_mask.sum() == 0 and child_mask.sum() == 0
    from PIL import Image

    width, height = Image.open(pick["boxed"].path).size
    area = sum(b.width * b.height for b in module.boxes[pick["boxed"].path.resolve()]) / (width * height)
    assert abs(float(boxed_mask.mean()) - area) < 0.03  # the boxes, scaled with the film to 224 px (overlaps aside)


def test_a_box_guided_run_logs_its_loss_the_pointing_game_and_selects_where_the_operating_point_lives(boxed_adults: Path,
                                                                                                      tmp_path: Path) -> None:  # fmt: skip
    from pneumoscan.learning.data import records_of

    data = DataConfig(root=boxed_adults, batch_size=8, num_workers=0, erase_borders=0.3)
    train = TrainConfig(epochs=1, limit_train_batches=3, limit_val_batches=1.0, out=tmp_path / "run", box_loss_weight=1.0,
                        select_by="operating")  # fmt: skip
    fit(data, train, command="test")
    history = read_history(tmp_path / "run" / "metrics.csv")[0]
    assert {"train_box_loss", "val_pointing_game", "val_partial_auroc_adult", "val_selection"} <= history.keys()
    assert history["val_selection"] == pytest.approx(history["val_partial_auroc_adult"] + 0.5 * history["val_pointing_game"], abs=1e-5)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["selection_metric"] == "val_selection" and config["train"]["box_loss_weight"] == 1.0
    module = XrayDataModule(data)
    module.setup()
    tested = {r.path for r in records_of([boxed_adults], "test")}
    assert tested and not tested & {r.path for r in module.train_records + module.val_records}  # the test part chose nothing


def test_the_partial_auroc_of_training_is_the_one_evaluation_reports() -> None:
    """Training selects by torchmetrics' figure (labels and scores flipped), evaluation reports scikit-learn's: the same."""
    from torchmetrics.classification import BinaryAUROC

    from pneumoscan.learning.evaluation import partial_auroc_at_sensitivity

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 600)
    scores = 1 / (1 + np.exp(-(1.5 * labels + rng.normal(0, 1, 600))))
    metric = BinaryAUROC(max_fpr=0.05)
    metric.update(1 - torch.tensor(scores, dtype=torch.float32), 1 - torch.tensor(labels))
    assert partial_auroc_at_sensitivity(labels, scores) == pytest.approx(float(metric.compute()), abs=1e-5)
    assert partial_auroc_at_sensitivity(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert partial_auroc_at_sensitivity(np.array([1, 1]), np.array([0.1, 0.2])) is None


def test_the_finer_map_starts_as_the_pretrained_model_and_its_mean_is_the_logit() -> None:
    from pneumoscan.learning.model import FineCam, SimpleCNN, head_parameters

    torch.manual_seed(0)
    coarse = PneumoniaClassifier(arch="efficientnet_lite0", pretrained=False, channels_last=False).eval()
    fine = PneumoniaClassifier(arch="efficientnet_lite0", pretrained=False, channels_last=False, fine_cam=True).eval()
    fine.model.backbone.load_state_dict(coarse.model.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        coarse_logits, coarse_cam = coarse.logits_and_cam(x)
        logits, cam = fine.logits_and_cam(x)
        assert torch.allclose(fine(x), coarse(x), atol=1e-5)  # the refinement starts at zero
        assert coarse_cam.shape[-2:] == (7, 7) and cam.shape[-2:] == (14, 14)
        assert torch.allclose(cam, coarse_cam.repeat_interleave(2, 1).repeat_interleave(2, 2), atol=1e-5)
        fine.model.refine.weight.normal_(0, 0.05)  # once it has learnt, a cell of 16 px can differ from its neighbour
        logits, cam = fine.logits_and_cam(x)
        assert torch.allclose(cam.mean(dim=(1, 2)), logits, atol=1e-5)  # still the class activation map of the logit
        assert torch.allclose(fine(x), logits, atol=1e-5)
        assert not torch.allclose(cam[:, 0::2, 0::2], cam[:, 1::2, 0::2])
    assert any(p is fine.model.refine.weight for p in head_parameters(fine.model))  # trained at the head's rate
    with pytest.raises(ConfigurationError, match="EfficientNet"):
        FineCam(SimpleCNN())


def test_a_fine_map_run_exports_its_map_and_quantises(boxed_adults: Path, tmp_path: Path) -> None:
    """Box-guided on the 14×14 map, exported: the graph's heat map is that map (each cell's sigmoid, upsampled, normalised) and
    int8 keeps the refinement in float."""
    from pneumoscan.learning.export import export
    from pneumoscan.learning.quantization import float_nodes
    from pneumoscan.running.inference import Predictor

    data = DataConfig(root=boxed_adults, batch_size=8, num_workers=0)
    train = TrainConfig(epochs=1, limit_train_batches=3, limit_val_batches=1.0, out=tmp_path / "run", box_loss_weight=1.0,
                        fine_cam=True)  # fmt: skip
    checkpoint = fit(data, train, command="test")
    card = export(checkpoint, tmp_path / "model", boxed_adults, int8=True)
    assert card["int8"]["file"]
    module = PneumoniaClassifier.load_from_checkpoint(checkpoint, map_location="cpu", pretrained=False).eval()
    film = next((boxed_adults / "images").iterdir())
    predictor = Predictor.load(tmp_path / "model")
    outputs = predictor.outputs([film], ["logit", "heatmap"])
    with torch.no_grad():
        logit, cam = module.logits_and_cam(torch.from_numpy(predictor.preprocess(film))[None])
    assert cam.shape[-2:] == (14, 14)
    expected = torch.nn.functional.interpolate(cam.sigmoid()[:, None], size=(224, 224), mode="bilinear", align_corners=False)[0, 0]
    expected = (expected - expected.min()) / (expected.max() - expected.min() + 1e-7)
    assert np.abs(outputs["heatmap"][0] - expected.numpy()).max() < 1e-3
    assert abs(float(outputs["logit"].reshape(-1)[0]) - float(logit[0])) < 1e-3
    refinement = [n for n in float_nodes(tmp_path / "model" / "model.onnx") if "refine" in n]
    assert refinement, "the refinement convolution stays float in int8"
