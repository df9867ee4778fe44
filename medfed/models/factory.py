"""Model factory: timm classification networks, small CPU-friendly CNNs, MONAI segmentation
networks (``monai:``, ``medfed:smallunet``; see :mod:`medfed.models.segmentation`), optional local
weights.

Nothing is downloaded: ``pretrained_path`` points at a local safetensors (or PyTorch) file, which is
how a federation starts from an agreed checkpoint (federated transfer learning).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from medfed.models.segmentation import (
    SEGMENTATION_NETS,
    build_segmentation_net,
    is_segmentation_net,
)
from medfed.registry import Registry, UnknownComponentError
from medfed.types import Task

BUILTIN: Registry[nn.Module] = Registry("model")

# The reference study's five networks and a small ResNet; any other timm name works too.
TIMM_CHOICES = (
    "vgg19",
    "resnet50",
    "resnext50_32x4d",
    "seresnet50",
    "seresnext50_32x4d",
    "resnet18",
)


class SmallCNN(nn.Module):
    """A stride-2 stem, three conv-BN-ReLU blocks and global pooling.

    Sized for 2 CPU cores at 64 px: the stem halves the resolution at once, which (measured)
    triples CPU throughput over a full-resolution first block at no cost in AUC on the synthetic
    ultrasound. BatchNorm is deliberate: it makes FedBN meaningful and mirrors the reference CNNs.
    """

    def __init__(
        self, *, in_chans: int, num_classes: int, width: int = 16, norm: str = "batch"
    ) -> None:
        super().__init__()
        chans = [width, 2 * width, 4 * width, 8 * width]

        def norm_layer(c: int) -> nn.Module:
            # GroupNorm normalises each image on its own, so no statistic depends on which site
            # a batch came from: the usual cure for BatchNorm's trouble under non-IID sites.
            return nn.BatchNorm2d(c) if norm == "batch" else nn.GroupNorm(max(1, c // 8), c)

        def block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                norm_layer(cout),
                nn.ReLU(inplace=True),
            ]

        layers = block(in_chans, chans[0], stride=2)
        for cin, cout in zip(chans[:-1], chans[1:], strict=True):
            layers += [nn.MaxPool2d(2), *block(cin, cout)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(chans[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


class TinyCNN(nn.Module):
    """conv 16 -> conv 32 -> linear, no normalisation: the engine-overhead benchmark's network."""

    def __init__(self, *, in_chans: int, num_classes: int, image_size: int = 28) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        side = image_size // 4
        self.fc = nn.Linear(32 * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc(x.flatten(1))


@BUILTIN.register("smallcnn")
def _smallcnn(*, in_chans: int, num_classes: int, image_size: int) -> nn.Module:
    return SmallCNN(in_chans=in_chans, num_classes=num_classes)


@BUILTIN.register("smallcnn_gn")
def _smallcnn_gn(*, in_chans: int, num_classes: int, image_size: int) -> nn.Module:
    return SmallCNN(in_chans=in_chans, num_classes=num_classes, norm="group")


@BUILTIN.register("tinycnn")
def _tinycnn(*, in_chans: int, num_classes: int, image_size: int) -> nn.Module:
    return TinyCNN(in_chans=in_chans, num_classes=num_classes, image_size=image_size)


def model_names() -> list[str]:
    medfed = [f"medfed:{n}" for n in BUILTIN.names()]
    medfed += [n for n in SEGMENTATION_NETS if n.startswith("medfed:")]
    monai = [n for n in SEGMENTATION_NETS if n.startswith("monai:")]
    return sorted(medfed) + sorted(monai) + [f"timm:{n}" for n in TIMM_CHOICES]


def check_model_name(name: str) -> str:
    """Validate a model name without building it (used by config validation)."""
    if is_segmentation_net(name):
        return name
    source, _, arch = name.partition(":") if ":" in name else ("timm", ":", name)
    if source == "medfed":
        if arch not in BUILTIN:
            raise UnknownComponentError("model", name, model_names())
        return name
    if source == "timm":
        import timm

        if not timm.is_model(arch):
            raise UnknownComponentError("model", name, model_names())
        return name
    raise UnknownComponentError("model", name, model_names())


def model_task(name: str) -> Task:
    """What a (valid) model name predicts: config validation refuses a classification network
    for a segmentation task and vice versa. Segmentation networks output per-pixel logits
    ``(B, num_classes, *spatial)``; classification networks ``(B, num_classes)``."""
    check_model_name(name)
    return Task.SEGMENTATION if is_segmentation_net(name) else Task.CLASSIFICATION


def create_model(
    name: str,
    *,
    num_classes: int,
    in_chans: int,
    image_size: int | Sequence[int] = 64,
    pretrained_path: str | Path | None = None,
    freeze_backbone: bool = False,
    spatial_dims: int = 2,
) -> nn.Module:
    """Build ``medfed:<name>``, ``monai:<name>`` or ``timm:<name>`` (a bare name means timm).

    ``spatial_dims`` (2 or 3) applies to segmentation networks; classification networks are 2-D
    only. ``image_size`` is the input side (or every side, for volumes): segmentation networks
    check it fits their strides.
    """
    check_model_name(name)
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if is_segmentation_net(name):
        if freeze_backbone:
            raise ValueError(
                f"freeze_backbone is not supported for the segmentation network {name}: "
                "it has no classifier head to train alone (the decoder is the head)"
            )
        model = build_segmentation_net(
            name,
            in_chans=in_chans,
            num_classes=num_classes,
            spatial_dims=spatial_dims,
            image_size=image_size,
        )
        if pretrained_path is not None:
            load_pretrained(model, pretrained_path)
        return model
    if spatial_dims != 2:
        raise ValueError(
            f"{name} is 2-D only; spatial_dims={spatial_dims} needs a segmentation network: "
            f"{', '.join(SEGMENTATION_NETS)}"
        )
    source, _, arch = name.partition(":") if ":" in name else ("timm", ":", name)
    if source == "medfed":
        side = image_size if isinstance(image_size, int) else int(image_size[-1])
        model = BUILTIN.entry(arch).factory(
            in_chans=in_chans, num_classes=num_classes, image_size=side
        )
    else:
        import timm

        model = timm.create_model(
            arch, pretrained=False, num_classes=num_classes, in_chans=in_chans
        )
    if pretrained_path is not None:
        load_pretrained(model, pretrained_path)
    if freeze_backbone:
        freeze_all_but_head(model)
    return model


def _find_head(model: nn.Module) -> nn.Module | None:
    """The classifier head (timm's get_classifier, or our ``head``/``fc``); None if there is none."""
    head: object = None
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        head = get_classifier()
    elif hasattr(model, "head"):
        head = model.head
    elif hasattr(model, "fc"):
        head = model.fc
    return head if isinstance(head, nn.Module) else None


def _head_names(model: nn.Module) -> set[str]:
    """Parameter names of the classifier head."""
    head = _find_head(model)
    if head is None:
        raise ValueError(
            f"cannot find the classifier head of {type(model).__name__} "
            "(segmentation networks have none)"
        )
    ids = {id(p) for p in head.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def load_pretrained(model: nn.Module, path: str | Path) -> None:
    """Load local weights; a classifier of a different shape (other class count) is left fresh.

    A network without a classifier head (a segmentation network) must match in every shape.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = load_file(str(path))
    else:
        # weights_only refuses pickled code: a weight file from elsewhere must not run anything.
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(loaded, dict) and "state_dict" in loaded:
            loaded = loaded["state_dict"]
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a state dict of tensors")
        state = loaded
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(
            f"{path}: keys not in the model: {unknown[:5]}{'...' if len(unknown) > 5 else ''}"
        )
    compatible = {k: v for k, v in state.items() if v.shape == own[k].shape}
    mismatched = set(state) - set(compatible)
    if mismatched:
        if _find_head(model) is None:
            shown = [
                f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(mismatched)
            ]
            raise ValueError(
                f"{path}: shape mismatch (the network has no classifier head to leave fresh, so "
                f"every tensor must match; other class or channel count?): {shown[:5]}"
            )
        outside = mismatched - _head_names(model)
        if outside:
            raise ValueError(
                f"{path}: shape mismatch outside the classifier head: {sorted(outside)[:5]}"
            )
    model.load_state_dict(compatible, strict=False)


def freeze_all_but_head(model: nn.Module) -> None:
    head = _head_names(model)
    for n, p in model.named_parameters():
        p.requires_grad_(n in head)
