"""Networks for the terminal-phase experiments: a body (input -> penultimate features) and a head.

Every model is a :class:`Classifier`: ``model.body`` maps an input to the penultimate features h
(B x d, the input of the last linear layer), ``model.head`` is an :class:`nc_lib.heads.Head`
(default :class:`~nc_lib.heads.LinearHead`; fixed or implicit ETF heads drop in), ``model(x)`` gives
logits and ``model.features(x)`` gives h. ``model.feature_dim`` is d. Named heads (``head=``):
``linear``, ``linear_nobias``, ``fixed_etf`` (learned bias), ``fixed_etf_nobias``, ``fixed_etf_centre``,
``cosine``, ``implicit_etf`` and ``implicit_etf_nograd`` (Markou 2024); more
via :func:`register_head`.

Architectures (Papyan, Han & Donoho 2020; Zhu et al. 2021; REFERENCE.md section 3):

- :class:`MLP`: ``depth`` hidden layers Linear -> (BatchNorm) -> ReLU of ``hidden`` units.
- :class:`VGG` 11/13/19 with batch norm after every convolution and, in the classifier, batch
  norm in place of dropout (Papyan): conv stages -> adaptive average pool to 1x1 -> two
  Linear-BN-ReLU layers of ``fc_width`` (default 512 x width) units -> head.
- :class:`ResNet` 18/50/152: ``stem="cifar"`` (3x3 conv stride 1, no max-pool) or ``"imagenet"``
  (7x7 conv stride 2 + 3x3 max-pool). ``feature_dim=d`` narrows the last block of layer4 to d
  output channels (its last convolution outputs d channels, its shortcut is a 1x1 conv + BN), as
  in Zhu et al.'s d = C experiment: ResNet18-CIFAR 11.17M -> 8.87M parameters at d = C = 10.
- :class:`DenseNet`: DenseNet40 is the *classic* (non-BC) DenseNet of Huang et al. (growth 12,
  3 blocks of 12 BN-ReLU-Conv3x3 layers, 16 initial channels, no compression; ``bc=True`` gives
  DenseNet-BC-40); DenseNet250 is DenseNet-BC-250 (growth 24, 3 blocks of 41 bottleneck layers,
  compression 0.5, CIFAR stem); DenseNet201 is DenseNet-BC-201 (growth 32, blocks 6/12/48/32,
  compression 0.5, ImageNet stem by default). Dropout 0 everywhere. ``feature_dim=d`` appends a
  1x1 conv -> BN -> ReLU to d channels before the global pooling.

Every convolutional net ends with adaptive average pooling and uses ``ceil_mode`` pooling, so any
input size works, down to 8x8 digits; 1-D inputs (B x C x L, e.g. MNIST-1D) are treated as
1 x L images. ``width`` multiplies every channel count (and the DenseNet growth rate).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .heads import CosineHead, FixedETFHead, Head, ImplicitETFHead, LinearHead
from .validation import check_choice, check_int, check_positive

HeadSpec = Any  # None | str | Head | Callable[[int, int], Head]

#: named heads: name -> factory(feature_dim, num_classes) -> Head. Other modules may register more.
HEADS: dict[str, Callable[[int, int], Head]] = {
    "linear": lambda d, C: LinearHead(d, C, bias=True),
    "linear_nobias": lambda d, C: LinearHead(d, C, bias=False),
    "fixed_etf": lambda d, C: FixedETFHead(d, C, bias="learned"),
    "fixed_etf_nobias": lambda d, C: FixedETFHead(d, C, bias="none"),
    "fixed_etf_centre": lambda d, C: FixedETFHead(d, C, bias="centre"),
    "cosine": lambda d, C: CosineHead(d, C),  # Markou's "standard" (normalised) classifier
    "implicit_etf": lambda d, C: ImplicitETFHead(d, C),  # Markou's implicit ETF classifier
    # the paper's ablation: no gradient through the node
    "implicit_etf_nograd": lambda d, C: ImplicitETFHead(d, C, backprop_through_node=False),
}


def register_head(name: str, factory: Callable[[int, int], Head]) -> None:
    """Make ``build_model(..., head=name)`` build ``factory(feature_dim, num_classes)``."""
    HEADS[name] = factory


def make_head(head: HeadSpec, feature_dim: int, num_classes: int) -> Head:
    """A head from a spec: None (LinearHead), a registered name, a Head instance, or a factory(d, C)."""
    if head is None:
        return LinearHead(feature_dim, num_classes)
    if isinstance(head, str):
        check_choice("head", head, sorted(HEADS))
        h = HEADS[head](feature_dim, num_classes)
    elif isinstance(head, Head):
        h = head
    elif callable(head):
        h = head(feature_dim, num_classes)
    else:
        raise ValueError(f"head={head!r} is not valid; give None, a Head, a factory(d, C), or one of {sorted(HEADS)}.")
    if not isinstance(h, Head):
        raise ValueError(f"head must produce an nc_lib.heads.Head, got {type(h).__name__}.")
    if h.feature_dim != feature_dim or h.num_classes != num_classes:
        raise ValueError(f"head has feature_dim={h.feature_dim}, num_classes={h.num_classes}; the model needs "
                         f"feature_dim={feature_dim}, num_classes={num_classes}.")
    return h


def _ch(c: float, width: float) -> int:
    return max(1, int(round(c * width)))


class Classifier(nn.Module):
    """``body`` (input -> penultimate features, B x d) followed by ``head`` (features -> logits)."""

    def __init__(self, body: nn.Module, feature_dim: int, num_classes: int, head: HeadSpec = None) -> None:
        super().__init__()
        self.body = body
        self.feature_dim = int(feature_dim)
        self.num_classes = int(num_classes)
        self.head = make_head(head, self.feature_dim, self.num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features h (the head's input), B x d."""
        return self.body(x)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Logits. Heads that need the labels in training (``head.needs_labels``, e.g. Markou's
        implicit ETF head) get them when given."""
        h = self.body(x)
        if labels is not None and getattr(self.head, "needs_labels", False):
            return self.head(h, labels)
        return self.head(h)


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class As2d(nn.Module):
    """Pass images through; turn 1-D signals B x C x L into B x C x 1 x L images."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:
            return x.unsqueeze(2)
        if x.dim() != 4:
            raise ValueError(f"convolutional nets take B x C x H x W images or B x C x L signals; got shape {tuple(x.shape)}.")
        return x


# ----------------------------------------------------------------------------------------------
# MLP
# ----------------------------------------------------------------------------------------------
class MLP(Classifier):
    """Flatten -> ``depth`` x [Linear(hidden) -> BatchNorm1d (optional) -> ReLU] -> head.

    ``hidden`` is multiplied by ``width``; ``feature_dim`` (default: the hidden width) sets the
    width of the last hidden layer.
    """

    def __init__(self, input_shape: Sequence[int] | int, num_classes: int, *, hidden: int = 512, depth: int = 3,
                 batch_norm: bool = True, width: float = 1.0, feature_dim: int | None = None,
                 head: HeadSpec = None) -> None:
        in_features = int(math.prod(input_shape)) if not isinstance(input_shape, int) else int(input_shape)
        depth = check_int("depth", depth, 1)
        h = _ch(check_int("hidden", hidden, 1), check_positive("width", width))
        d = check_int("feature_dim", feature_dim, 1) if feature_dim is not None else h
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for i in range(depth):
            out = d if i == depth - 1 else h
            layers.append(nn.Linear(prev, out, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(out))
            layers.append(nn.ReLU(inplace=True))
            prev = out
        super().__init__(nn.Sequential(*layers), d, num_classes, head)


# ----------------------------------------------------------------------------------------------
# VGG
# ----------------------------------------------------------------------------------------------
VGG_CONFIGS: dict[int, list[Any]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(Classifier):
    """VGG with BN after every convolution; classifier FC layers with BN instead of dropout (Papyan)."""

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, *, width: float = 1.0,
                 fc_width: int | None = None, fc_layers: int = 2, feature_dim: int | None = None,
                 head: HeadSpec = None) -> None:
        check_choice("depth", depth, sorted(VGG_CONFIGS))
        check_positive("width", width)
        layers: list[nn.Module] = [As2d()]
        c = check_int("in_channels", in_channels, 1)
        for v in VGG_CONFIGS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                out = _ch(v, width)
                layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                c = out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        fc = _ch(512, width) if fc_width is None else check_int("fc_width", fc_width, 1)
        fc_layers = check_int("fc_layers", fc_layers, 0)
        d = c
        for i in range(fc_layers):
            out = feature_dim if (feature_dim is not None and i == fc_layers - 1) else fc
            layers += [nn.Linear(d, out, bias=False), nn.BatchNorm1d(out), nn.ReLU(inplace=True)]
            d = out
        if feature_dim is not None and fc_layers == 0:
            layers += [nn.Linear(d, feature_dim, bias=False), nn.BatchNorm1d(feature_dim), nn.ReLU(inplace=True)]
            d = feature_dim
        body = nn.Sequential(*layers)
        _init_weights(body)
        super().__init__(body, d, num_classes, head)


# ----------------------------------------------------------------------------------------------
# ResNet
# ----------------------------------------------------------------------------------------------
def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    """Identity, or a 1x1 convolution with batch norm where the shape changes (also the d = C narrowing)."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, out_planes: int | None = None) -> None:
        super().__init__()
        out = planes * self.expansion if out_planes is None else out_planes
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_planes, out, stride)

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, out_planes: int | None = None) -> None:
        super().__init__()
        out = planes * self.expansion if out_planes is None else out_planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_planes, out, stride)

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + self.shortcut(x))


RESNET_CONFIGS: dict[int, tuple[type, tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}
STEMS = ("cifar", "imagenet")


class ResNet(Classifier):
    """ResNet (He et al.) with a CIFAR stem (3x3 conv, stride 1, no max-pool) or the ImageNet stem.

    ``feature_dim=d`` narrows the last block of layer4 to d output channels (1x1-conv shortcut),
    Zhu et al. 2021's d = C construction.
    """

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, *, stem: str = "cifar",
                 width: float = 1.0, feature_dim: int | None = None, head: HeadSpec = None) -> None:
        check_choice("depth", depth, sorted(RESNET_CONFIGS))
        check_choice("stem", stem, STEMS)
        check_positive("width", width)
        block, counts = RESNET_CONFIGS[depth]
        c0 = _ch(64, width)
        cin = check_int("in_channels", in_channels, 1)
        if stem == "cifar":
            stem_layers: list[nn.Module] = [nn.Conv2d(cin, c0, 3, 1, 1, bias=False), nn.BatchNorm2d(c0), nn.ReLU(inplace=True)]
        else:
            stem_layers = [nn.Conv2d(cin, c0, 7, 2, 3, bias=False), nn.BatchNorm2d(c0), nn.ReLU(inplace=True),
                           nn.MaxPool2d(3, 2, 1)]
        layers: list[nn.Module] = [As2d(), *stem_layers]
        in_planes = c0
        for stage, (mult, n) in enumerate(zip((64, 128, 256, 512), counts)):
            planes = _ch(mult, width)
            blocks = []
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                last = stage == 3 and i == n - 1
                out = feature_dim if (last and feature_dim is not None) else None
                blk = block(in_planes, planes, stride, out)
                blocks.append(blk)
                in_planes = planes * block.expansion if out is None else out
            layers.append(nn.Sequential(*blocks))
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        body = nn.Sequential(*layers)
        _init_weights(body)
        super().__init__(body, in_planes, num_classes, head)


# ----------------------------------------------------------------------------------------------
# DenseNet
# ----------------------------------------------------------------------------------------------
class _DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bottleneck: bool, bn_size: int = 4) -> None:
        super().__init__()
        if bottleneck:
            inner = bn_size * growth
            self.net = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, inner, 1, bias=False),
                                     nn.BatchNorm2d(inner), nn.ReLU(inplace=True), nn.Conv2d(inner, growth, 3, 1, 1, bias=False))
        else:
            self.net = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, growth, 3, 1, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.net(x)], 1)


class _Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, cout, 1, bias=False),
                         nn.AvgPool2d(2, ceil_mode=True))


DENSENET_CONFIGS: dict[int, dict[str, Any]] = {
    40: {"growth": 12, "blocks": (12, 12, 12), "bc": False, "stem": "cifar"},
    100: {"growth": 12, "blocks": (16, 16, 16), "bc": True, "stem": "cifar"},
    121: {"growth": 32, "blocks": (6, 12, 24, 16), "bc": True, "stem": "imagenet"},
    201: {"growth": 32, "blocks": (6, 12, 48, 32), "bc": True, "stem": "imagenet"},
    250: {"growth": 24, "blocks": (41, 41, 41), "bc": True, "stem": "cifar"},
}


class DenseNet(Classifier):
    """DenseNet (Huang et al.), dropout 0. See the module docstring for the exact variants."""

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, *, width: float = 1.0,
                 bc: bool | None = None, stem: str | None = None, growth: int | None = None,
                 compression: float = 0.5, feature_dim: int | None = None, head: HeadSpec = None) -> None:
        check_choice("depth", depth, sorted(DENSENET_CONFIGS))
        check_positive("width", width)
        cfg = DENSENET_CONFIGS[depth]
        bc = cfg["bc"] if bc is None else bool(bc)
        stem = check_choice("stem", cfg["stem"] if stem is None else stem, STEMS)
        k = _ch(cfg["growth"] if growth is None else check_int("growth", growth, 1), width)
        blocks = cfg["blocks"]
        if depth == 40 and bc:  # DenseNet-BC-40: (40 - 4) / 6 = 6 bottleneck layers per block
            blocks = (6, 6, 6)
        cin = check_int("in_channels", in_channels, 1)
        c = 2 * k if bc else _ch(16, width)
        if stem == "cifar":
            layers: list[nn.Module] = [As2d(), nn.Conv2d(cin, c, 3, 1, 1, bias=False)]
        else:
            c = 2 * k
            layers = [As2d(), nn.Conv2d(cin, c, 7, 2, 3, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                      nn.MaxPool2d(3, 2, 1, ceil_mode=True)]
        theta = compression if bc else 1.0
        for b, n in enumerate(blocks):
            for _ in range(n):
                layers.append(_DenseLayer(c, k, bc))
                c += k
            if b < len(blocks) - 1:
                cout = max(1, int(math.floor(theta * c)))
                layers.append(_Transition(c, cout))
                c = cout
        layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        if feature_dim is not None:
            d = check_int("feature_dim", feature_dim, 1)
            layers += [nn.Conv2d(c, d, 1, bias=False), nn.BatchNorm2d(d), nn.ReLU(inplace=True)]
            c = d
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        body = nn.Sequential(*layers)
        _init_weights(body)
        super().__init__(body, c, num_classes, head)


# ----------------------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------------------
MODELS = ("mlp", "vgg11", "vgg13", "vgg19", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
          "densenet40", "densenet100", "densenet121", "densenet201", "densenet250")


#: the architecture options ``build_model`` accepts, per family of :data:`MODELS`
MODEL_OPTIONS: dict[str, set[str]] = {"mlp": {"hidden", "depth", "batch_norm"}, "vgg": {"fc_width", "fc_layers"},
                                      "resnet": {"stem"}, "densenet": {"bc", "stem", "growth", "compression"}}


def model_family(name: str) -> str:
    """The family of a model of :data:`MODELS`: "mlp", "vgg", "resnet" or "densenet"."""
    key = check_choice("model", str(name).lower().replace("-", "").replace("_", ""), MODELS)
    return next(f for f in MODEL_OPTIONS if key.startswith(f))


def build_model(name: str, *, num_classes: int, in_channels: int = 3, width: float = 1.0,
                feature_dim: int | None = None, head: HeadSpec = None, input_shape: Sequence[int] | None = None,
                **kw: Any) -> Classifier:
    """Build a :class:`Classifier` by name (one of :data:`MODELS`).

    ``input_shape`` (the shape of one input) is required by the MLP and, when given, sets
    ``in_channels`` for the conv nets. Extra keywords go to the architecture: MLP ``hidden``,
    ``depth``, ``batch_norm``; VGG ``fc_width``, ``fc_layers``; ResNet ``stem``; DenseNet ``bc``,
    ``stem``, ``growth``, ``compression``.
    """
    key = check_choice("name", str(name).lower().replace("-", "").replace("_", ""), MODELS)
    num_classes = check_int("num_classes", num_classes, 2)
    if feature_dim is not None:
        feature_dim = check_int("feature_dim", feature_dim, 1)
    allowed = MODEL_OPTIONS
    family = model_family(key)
    for k in kw:
        if k not in allowed[family]:
            raise ValueError(f"unknown option {k!r} for model {name!r}; valid options: {sorted(allowed[family])}.")
    if family == "mlp":
        if input_shape is None:
            raise ValueError("build_model('mlp', ...) needs input_shape, the shape of one input (e.g. (1, 8, 8)).")
        return MLP(tuple(input_shape), num_classes, width=width, feature_dim=feature_dim, head=head, **kw)
    if input_shape is not None:
        in_channels = int(tuple(input_shape)[0])
    depth = int(key[len(family):])
    cls = {"vgg": VGG, "resnet": ResNet, "densenet": DenseNet}[family]
    return cls(depth, num_classes, in_channels, width=width, feature_dim=feature_dim, head=head, **kw)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
