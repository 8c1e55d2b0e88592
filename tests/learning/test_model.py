from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as sample_images

from pneumoscan.errors import ConfigurationError, PretrainedWeightsUnavailableError
from pneumoscan.inputs.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from pneumoscan.learning.model import backbone_parameters, create_model, head_parameters


def imagenet_input(rgb: np.ndarray) -> torch.Tensor:
    image = Image.fromarray(rgb).convert("RGB").resize((224, 224), Image.Resampling.BICUBIC)
    x = (np.asarray(image, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(x.transpose(2, 0, 1).astype(np.float32)).unsqueeze(0)


@pytest.fixture(scope="module")
def imagenet_model() -> torch.nn.Module:
    return create_model("efficientnet_lite0", pretrained=True, num_classes=1000).eval()


def top5(model: torch.nn.Module, rgb: np.ndarray) -> list[int]:
    with torch.no_grad():
        return model(imagenet_input(rgb)).topk(5).indices[0].tolist()


def test_offline_weights_recognise_a_cat(imagenet_model: torch.nn.Module) -> None:
    assert set(top5(imagenet_model, sample_images.chelsea())) & set(range(281, 286))


def test_offline_weights_recognise_coffee(imagenet_model: torch.nn.Module) -> None:
    assert top5(imagenet_model, sample_images.coffee())[0] in (967, 968)


def test_random_weights_do_not_pass_the_same_check() -> None:
    """Guards the check itself: it must be able to fail."""
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", pretrained=False, num_classes=1000).eval()
    assert top5(model, sample_images.coffee())[0] not in (967, 968) or not (
        set(top5(model, sample_images.chelsea())) & set(range(281, 286))
    )


def test_default_model_has_one_pneumonia_logit() -> None:
    model = create_model().eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 224, 224)).shape == (2, 1)
    assert len(head_parameters(model)) == 2
    assert len(backbone_parameters(model)) + 2 == len(list(model.parameters()))


def test_simple_cnn_baseline() -> None:
    model = create_model("simple_cnn", pretrained=False).eval()
    with torch.no_grad():
        assert model(torch.zeros(3, 3, 224, 224)).shape == (3, 1)


def test_other_timm_models_work_without_pretrained_weights() -> None:
    model = create_model("resnet18", pretrained=False).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1)


def test_pretrained_weights_that_are_not_offline_are_a_clear_error() -> None:
    with pytest.raises(PretrainedWeightsUnavailableError, match="never downloads"):
        create_model("resnet18", pretrained=True)
    with pytest.raises(PretrainedWeightsUnavailableError, match="from scratch"):
        create_model("simple_cnn", pretrained=True)


def test_unknown_architecture_is_a_clear_error() -> None:
    with pytest.raises(ConfigurationError, match="unknown architecture"):
        create_model("no_such_net", pretrained=False)


@pytest.mark.parametrize("arch", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite1_and_lite2_weights_load_offline_and_recognise_the_photos(arch: str) -> None:
    """The same key mapping serves the larger Lite models of issue 8's ablations."""
    model = create_model(arch, pretrained=True, num_classes=1000).eval()
    assert top5(model, sample_images.coffee())[0] in (967, 968)
    assert set(top5(model, sample_images.chelsea())) & set(range(281, 286))
