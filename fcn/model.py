"""The FCN family (Long, Shelhamer, Darrell): FCN-32s, FCN-16s, FCN-8s on a torchvision VGG.

FCN-8s: score the stride-32 features, upsample ×2, add the scored pool4, upsample ×2, add the
scored pool3, upsample ×8. FCN-16s stops after the pool4 skip and upsamples ×16; FCN-32s has no
skip and upsamples the stride-32 scores ×32. Transposed convolutions start as bilinear
interpolation, score layers as zero, as in the paper. Inputs of any size are padded to a
multiple of 32 and the output is cropped back, so every skip adds maps of exactly the same size
(no offset crop needed) and the output always has the input's height and width.

The three share their module names (`score_pool5`, `score_pool4`, `up_pool5`, …; `up_final` is
the last upsampling, whose kernel differs per arch), so the paper's staged training, 32s → 16s
→ 8s, is whole-model initialisation by name and shape (`train.init`): the coarser model's
layers load, the new skip's zero-initialised score layer and bilinear upsampling start fresh.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from fcn.errors import DataError, torch_load_problem
from fcn.cityscapes.labels import NUM_CLASSES
from fcn.params import ARCHS, BACKBONES, ModelParams

log = logging.getLogger(__name__)

STRIDE = 32
OUTPUT_STRIDES = {"fcn32s": 32, "fcn16s": 16, "fcn8s": 8}
"""Each arch's finest skip: the stride of the scores the last upsampling starts from."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def bilinear_kernel(channels: int, factor: int) -> torch.Tensor:
    """Weights that make ConvTranspose2d(k=2f, stride=f, padding=f/2) bilinear upsampling
    (align_corners=False), one channel to itself."""
    size = 2 * factor
    center = factor - 0.5
    ramp = 1 - (torch.arange(size, dtype=torch.float64) - center).abs() / factor
    kernel = (ramp[:, None] * ramp[None, :]).float()
    weight = torch.zeros(channels, channels, size, size)
    weight[range(channels), range(channels)] = kernel
    return weight


def _upsample(channels: int, factor: int) -> nn.ConvTranspose2d:
    layer = nn.ConvTranspose2d(channels, channels, 2 * factor, stride=factor,
                               padding=factor // 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(bilinear_kernel(channels, factor))
    return layer


def _score(in_channels: int, num_classes: int) -> nn.Conv2d:
    layer = nn.Conv2d(in_channels, num_classes, 1)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def split_at_pools(features: nn.Sequential) -> tuple[nn.Sequential, nn.Sequential, nn.Sequential]:
    """(…pool3, …pool4, …pool5) of a VGG `features`, found from its MaxPool layers."""
    pools = [i for i, layer in enumerate(features) if isinstance(layer, nn.MaxPool2d)]
    if len(pools) != 5:
        raise ValueError(f"expected a VGG with 5 pooling layers, found {len(pools)}")
    p3, p4, p5 = pools[2], pools[3], pools[4]
    return features[: p3 + 1], features[p3 + 1 : p4 + 1], features[p4 + 1 : p5 + 1]


VGG_CONFIGS = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}


def vgg_features(backbone: str) -> nn.Sequential:
    """torchvision's `vgg*.features`, initialised as torchvision does, without building the
    120M-parameter classifier that FCN8s throws away (that cost seconds per model)."""
    name = backbone.removesuffix("_bn")
    features = torchvision.models.vgg.make_layers(
        torchvision.models.vgg.cfgs[VGG_CONFIGS[name]], batch_norm=backbone.endswith("_bn"))
    for module in features.modules():  # the feature part of torchvision's VGG.__init__
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return features


def _out_channels(block: nn.Sequential) -> int:
    return [m for m in block if isinstance(m, nn.Conv2d)][-1].out_channels


class FCN(nn.Module):
    """Input: float images in [0, 1], (N, 3, H, W), any H and W. Output: (N, classes, H, W) logits.

    `arch`: fcn32s, fcn16s or fcn8s. ImageNet normalisation happens inside, so callers never
    have to remember it.
    """

    def __init__(self, backbone: str = "vgg11_bn", num_classes: int = NUM_CLASSES,
                 fc67: bool = False, fc_channels: int = 4096, arch: str = "fcn8s") -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {BACKBONES}")
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
        self.arch = arch
        self.backbone_name = backbone
        self.num_classes = num_classes
        self.to_pool3, self.to_pool4, self.to_pool5 = split_at_pools(vgg_features(backbone))
        top_channels = _out_channels(self.to_pool5)
        if fc67:
            self.head: nn.Module = nn.Sequential(
                nn.Conv2d(top_channels, fc_channels, 7, padding=3), nn.ReLU(inplace=True),
                nn.Dropout2d(), nn.Conv2d(fc_channels, fc_channels, 1), nn.ReLU(inplace=True),
                nn.Dropout2d(),
            )
            top_channels = fc_channels
        else:
            self.head = nn.Identity()
        stride = OUTPUT_STRIDES[arch]
        self.score_pool5 = _score(top_channels, num_classes)
        if stride <= 16:
            self.score_pool4 = _score(_out_channels(self.to_pool4), num_classes)
            self.up_pool5 = _upsample(num_classes, 2)
        if stride <= 8:
            self.score_pool3 = _score(_out_channels(self.to_pool3), num_classes)
            self.up_pool4 = _upsample(num_classes, 2)
        self.up_final = _upsample(num_classes, stride)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        x = (x - self.mean) / self.std
        # zero = the mean image after normalisation; padded even by 0 (a copy), so that the
        # graph has no branch on the input size and exports with dynamic height and width
        x = F.pad(x, (0, -width % STRIDE, 0, -height % STRIDE))
        pool3 = self.to_pool3(x)
        pool4 = self.to_pool4(pool3)
        score = self.score_pool5(self.head(self.to_pool5(pool4)))
        if self.arch != "fcn32s":
            score = self.up_pool5(score) + self.score_pool4(pool4)
        if self.arch == "fcn8s":
            score = self.up_pool4(score) + self.score_pool3(pool3)
        return self.up_final(score)[..., :height, :width]

    @classmethod
    def from_params(cls, params: ModelParams, num_classes: int = NUM_CLASSES) -> "FCN":
        """The architecture `params` describe, freshly initialised (no backbone weights loaded:
        `build_model` does that)."""
        return cls(params.backbone, num_classes, params.fc67, params.fc_channels, params.arch)

    def backbone_modules(self) -> list[nn.Module]:
        """The layers that ImageNet weights initialise (for per-group learning rates)."""
        return [self.to_pool3, self.to_pool4, self.to_pool5]

    def load_backbone(self, state: dict[str, torch.Tensor]) -> None:
        """Load a torchvision VGG state dict (`features.N.*`, optional `classifier.*`)."""
        features = [*self.to_pool3, *self.to_pool4, *self.to_pool5]
        own = nn.Sequential(*features)
        feature_state = {k[len("features."):]: v for k, v in state.items()
                         if k.startswith("features.")}
        try:
            missing, unexpected = own.load_state_dict(feature_state, strict=False)
        except RuntimeError as exc:  # same names, other shapes (e.g. another VGG's layers)
            raise DataError(f"backbone weights do not fit {self.backbone_name}: "
                            f"{str(exc).splitlines()[1].strip()} …") from None
        if missing or unexpected:
            raise DataError(f"backbone weights do not fit {self.backbone_name}: missing "
                            f"{missing[:5]}, unexpected {unexpected[:5]}")
        if isinstance(self.head, nn.Sequential) and "classifier.0.weight" in state:
            fc6, fc7 = self.head[0], self.head[3]
            fc6_weight = state["classifier.0.weight"]
            if fc6_weight.numel() == fc6.weight.numel():
                with torch.no_grad():  # the classic "convolutionalised" fc6/fc7
                    fc6.weight.copy_(fc6_weight.view_as(fc6.weight))
                    fc6.bias.copy_(state["classifier.0.bias"])
                    fc7.weight.copy_(state["classifier.3.weight"].view_as(fc7.weight))
                    fc7.bias.copy_(state["classifier.3.bias"])


def describe(params: ModelParams) -> str:
    """How messages and reports name an architecture: `fcn8s/vgg11_bn`, `+fc67` with fc6/fc7."""
    return f"{params.arch}/{params.backbone}" + ("+fc67" if params.fc67 else "")


def score_layers(model: FCN) -> list[nn.Conv2d]:
    """The model's 1×1 score layers, coarsest first (FCN-32s has one, FCN-8s three)."""
    return [getattr(model, name) for name in ("score_pool5", "score_pool4", "score_pool3")
            if hasattr(model, name)]


def imagenet_weights_file(backbone: str) -> tuple[Path, str]:
    """Where torch hub caches torchvision's ImageNet weights for `backbone`, and their URL."""
    weights = torchvision.models.get_model_weights(backbone).IMAGENET1K_V1
    filename = weights.url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / filename, weights.url


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: backbone weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is an input error
        raise DataError(f"{path}: backbone weights: {torch_load_problem(exc)}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise DataError(f"{path}: expected a state dict, got {type(state).__name__}")
    for name, tensor in state.items():  # a NaN would stop training at step 1 as "diverged"
        if not isinstance(tensor, torch.Tensor) or tensor.is_meta or tensor.is_nested \
                or tensor.layout != torch.strided:
            raise DataError(f"{path}: {name} is not a plain dense tensor")
        if (tensor.is_floating_point() or tensor.is_complex()) \
                and not bool(torch.isfinite(tensor).all()):
            raise DataError(f"{path}: backbone weight {name} holds NaN or infinite values")
    return state


FCN8s = FCN
"""The default arch's name, which most callers (and the tests) build: `FCN8s(backbone, …)` is
FCN-8s unless `arch` says otherwise."""


def build_model(params: ModelParams, num_classes: int = NUM_CLASSES) -> FCN:
    """The model `params` describe, with its backbone weights ('none', 'imagenet' or a path)."""
    model = FCN.from_params(params, num_classes)
    if params.weights == "none":
        return model
    if params.weights == "imagenet":
        path, url = imagenet_weights_file(params.backbone)
        if not path.is_file():
            raise DataError(
                f"ImageNet weights for {params.backbone} not found at {path}. This machine is "
                f"offline: download {url} elsewhere and place the file at that path (or set "
                f"model.weights to the file's path, or to 'none' to train from scratch)")
    else:
        path = Path(params.weights)
    model.load_backbone(load_state_dict_file(path))
    log.info("loaded %s backbone weights from %s", params.backbone, path)
    return model
