"""Segmentation networks in the model factory: shapes, gradients, determinism, tasks, errors."""

import pytest
import torch
from safetensors.torch import save_file

from medfed.models.factory import create_model, freeze_all_but_head, model_names, model_task
from medfed.models.segmentation import SEGMENTATION_NETS
from medfed.registry import UnknownComponentError
from medfed.types import Task

SEG = [
    "medfed:smallunet",
    "medfed:smallunet_bn",
    "medfed:tinyunet",
    "monai:unet",
    "monai:basicunet",
    "monai:attentionunet",
]
# 3-D inputs: sides must be multiples of 16 (8 for three strides) and instance norm needs more
# than one voxel at the bottleneck, so the 4-level networks get one longer side (2 voxels there).
VOLUME = {"monai:unet": (16, 16, 32), "monai:basicunet": (16, 16, 32)}


def test_registered_segmentation_names_are_listed():
    assert sorted(SEGMENTATION_NETS) == sorted(SEG)
    assert set(SEG) <= set(model_names())


@pytest.mark.parametrize("name", SEG)
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_builds_logits_of_input_size_and_gradients_flow(name, spatial_dims):
    shape = (32, 32) if spatial_dims == 2 else VOLUME.get(name, (16, 16, 16))
    batch = 2 if spatial_dims == 2 else 1
    torch.manual_seed(0)
    m = create_model(name, num_classes=3, in_chans=2, image_size=32, spatial_dims=spatial_dims)
    out = m(torch.randn(batch, 2, *shape))
    assert out.shape == (batch, 3, *shape)
    target = torch.randint(0, 3, (batch, *shape))
    torch.nn.functional.cross_entropy(out, target).backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("name", SEG)
def test_deterministic_under_manual_seed(name):
    def build() -> torch.nn.Module:
        torch.manual_seed(7)
        return create_model(name, num_classes=2, in_chans=1, image_size=32).eval()

    a, b = build(), build()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_model_task_for_every_listed_name():
    for name in model_names():
        expect = Task.SEGMENTATION if name in SEGMENTATION_NETS else Task.CLASSIFICATION
        assert model_task(name) is expect, name
    assert model_task("resnet18") is Task.CLASSIFICATION  # a bare name is timm
    assert model_task("medfed:smallunet") is Task.SEGMENTATION
    with pytest.raises(UnknownComponentError):
        model_task("monai:nope")


def test_unknown_monai_name_lists_the_choices():
    with pytest.raises(
        UnknownComponentError, match=r"allowed: .*monai:attentionunet, monai:basicunet, monai:unet"
    ):
        create_model("monai:vnet", num_classes=2, in_chans=1)
    with pytest.raises(UnknownComponentError, match="medfed:smallunet"):
        create_model("medfed:bigunet", num_classes=2, in_chans=1)


@pytest.mark.parametrize("name", ["timm:resnet18", "medfed:smallcnn"])
def test_classification_networks_are_2d_only(name):
    with pytest.raises(ValueError, match=rf"{name} is 2-D only"):
        create_model(name, num_classes=2, in_chans=1, spatial_dims=3)


def test_bad_spatial_dims_and_image_size_are_clear_errors():
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        create_model("monai:unet", num_classes=2, in_chans=1, spatial_dims=1)
    with pytest.raises(ValueError, match="multiple of 16 and at least 32.*got 40"):
        create_model("monai:unet", num_classes=2, in_chans=1, image_size=40)
    with pytest.raises(ValueError, match="multiple of 8 and at least 16.*got 8"):
        create_model("medfed:smallunet", num_classes=2, in_chans=1, image_size=8)


def test_freeze_backbone_is_refused_for_segmentation():
    with pytest.raises(ValueError, match="freeze_backbone is not supported.*monai:unet"):
        create_model("monai:unet", num_classes=2, in_chans=1, freeze_backbone=True)
    m = create_model("medfed:smallunet", num_classes=2, in_chans=1)
    with pytest.raises(ValueError, match="segmentation networks have none"):
        freeze_all_but_head(m)


def _save(model: torch.nn.Module, path) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def test_pretrained_weights_load_when_shapes_match(tmp_path):
    torch.manual_seed(0)
    src = create_model("medfed:smallunet", num_classes=2, in_chans=1)
    _save(src, tmp_path / "w.safetensors")
    torch.manual_seed(1)
    dst = create_model(
        "medfed:smallunet", num_classes=2, in_chans=1, pretrained_path=tmp_path / "w.safetensors"
    )
    s, d = src.state_dict(), dst.state_dict()
    assert all(torch.equal(s[k], d[k]) for k in s)


def test_pretrained_shape_mismatch_is_a_clear_error(tmp_path):
    src = create_model("medfed:smallunet", num_classes=3, in_chans=1)
    _save(src, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match=r"shape mismatch \(the network has no classifier head"):
        create_model(
            "medfed:smallunet",
            num_classes=2,
            in_chans=1,
            pretrained_path=tmp_path / "w.safetensors",
        )
