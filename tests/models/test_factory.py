import pytest
import torch
from safetensors.torch import save_file

from medfed.models.factory import check_model_name, create_model, model_names
from medfed.registry import UnknownComponentError

REFERENCE = ["vgg19", "resnet50", "resnext50_32x4d", "seresnet50", "seresnext50_32x4d"]


@pytest.mark.parametrize("name", ["medfed:smallcnn", "timm:resnet18"])
def test_forward_shape_and_channels(name):
    m = create_model(name, num_classes=3, in_chans=1, image_size=64)
    assert m(torch.randn(2, 1, 64, 64)).shape == (2, 3)


def test_tinycnn_is_conv16_conv32_linear():
    m = create_model("medfed:tinycnn", num_classes=10, in_chans=1, image_size=28)
    shapes = [tuple(p.shape) for p in m.parameters()]
    assert shapes == [(16, 1, 3, 3), (16,), (32, 16, 3, 3), (32,), (10, 32 * 7 * 7), (10,)]


@pytest.mark.parametrize("name", REFERENCE)
def test_reference_networks_build_with_data_shape(name):
    m = create_model(f"timm:{name}", num_classes=2, in_chans=1)
    first = next(p for p in m.parameters() if p.ndim == 4)
    assert first.shape[1] == 1  # in_chans from the data
    assert m.get_classifier().out_features == 2


def test_unknown_names_list_allowed():
    with pytest.raises(UnknownComponentError, match="allowed: .*medfed:smallcnn"):
        check_model_name("medfed:nope")
    with pytest.raises(UnknownComponentError):
        check_model_name("timm:not_a_real_net")
    assert "timm:resnet50" in model_names()


def test_local_weights_backbone_kept_head_fresh_when_classes_differ(tmp_path):
    torch.manual_seed(0)
    src = create_model("medfed:smallcnn", num_classes=5, in_chans=1)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    torch.manual_seed(1)
    dst = create_model("medfed:smallcnn", num_classes=2, in_chans=1, pretrained_path=path)
    s, d = src.state_dict(), dst.state_dict()
    assert torch.equal(s["features.0.weight"], d["features.0.weight"])
    assert d["head.weight"].shape == (2, 128)


def test_mismatch_outside_head_is_an_error(tmp_path):
    src = create_model("medfed:smallcnn", num_classes=2, in_chans=3)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match="outside the classifier head"):
        create_model("medfed:smallcnn", num_classes=2, in_chans=1, pretrained_path=path)


def test_freeze_backbone_trains_only_the_head():
    m = create_model("medfed:smallcnn", num_classes=2, in_chans=1, freeze_backbone=True)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    m(torch.randn(4, 1, 32, 32)).sum().backward()
    opt.step()
    after = m.state_dict()
    assert torch.equal(before["features.0.weight"], after["features.0.weight"])
    assert not torch.equal(before["head.weight"], after["head.weight"])
