import torch
import torch.nn.functional as F

from medfed.client.train import TrainOptions, predict_proba, to_input, train_local
from medfed.models.factory import create_model
from tests.conftest import make_site_data


def _model(seed=0):
    torch.manual_seed(seed)
    return create_model("medfed:tinycnn", num_classes=2, in_chans=1, image_size=16)


def test_matches_a_plain_pytorch_loop():
    """The engine's loop must do exactly the arithmetic of a textbook SGD loop."""
    data = make_site_data(50, size=16)
    opts = TrainOptions(
        epochs=2, batch_size=8, lr=0.05, momentum=0.9, augment=False, normalize="fixed"
    )
    ours = _model()
    train_local(
        ours, data, opts, generator=torch.Generator().manual_seed(3), device=torch.device("cpu")
    )

    ref = _model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(3)
    x_all = (data.images.float() / 255 - 0.5) / 0.25
    for _ in range(2):
        perm = torch.randperm(50, generator=g)
        for i in range(0, 50, 8):
            idx = perm[i : i + 8]
            if len(idx) < 2:
                continue
            opt.zero_grad()
            F.cross_entropy(ref(x_all[idx]), data.labels[idx]).backward()
            opt.step()
    for (k, a), b in zip(ours.state_dict().items(), ref.state_dict().values(), strict=False):
        assert torch.allclose(a, b, atol=1e-6), k


def test_deterministic_given_generator_and_learns():
    data = make_site_data(96, size=16, seed=1)
    opts = TrainOptions(epochs=8, batch_size=16, lr=0.05)
    a, b = _model(), _model()
    ra = train_local(
        a, data, opts, generator=torch.Generator().manual_seed(0), device=torch.device("cpu")
    )
    train_local(
        b, data, opts, generator=torch.Generator().manual_seed(0), device=torch.device("cpu")
    )
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=False)
    )
    assert ra.num_examples == 8 * 96 and ra.num_steps == 8 * 6
    proba = predict_proba(a, data, device=torch.device("cpu"))
    assert ((proba.argmax(1) == data.labels.numpy()).mean()) > 0.8


def test_max_steps_and_hooks():
    data = make_site_data(64, size=16)
    calls = {"loss": 0, "grad": 0}

    def loss_term(model):
        calls["loss"] += 1
        return torch.zeros(())

    def grad_hook(model):
        calls["grad"] += 1

    r = train_local(
        _model(),
        data,
        TrainOptions(epochs=5, batch_size=8, max_steps=3),
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
        loss_term=loss_term,
        grad_hook=grad_hook,
    )
    assert r.num_steps == 3 and r.num_examples == 24
    assert calls == {"loss": 3, "grad": 3}


def test_to_input_fixed_normalisation():
    x = to_input(torch.tensor([[[[0, 255]]]], dtype=torch.uint8), torch.device("cpu"))
    assert torch.allclose(x, torch.tensor([[[[-2.0, 2.0]]]]))


def test_to_input_per_image_removes_gain_and_contrast():
    base = torch.tensor([[[[10, 20], [30, 40]]]], dtype=torch.uint8)
    brighter = base * 2 + 50  # another scanner: different gain and offset
    a = to_input(base, torch.device("cpu"), normalize="per_image")
    b = to_input(brighter, torch.device("cpu"), normalize="per_image")
    assert torch.allclose(a, b, atol=1e-5)
    # hand check: values 10..40 -> mean 25, sample std 12.9099
    assert torch.allclose(a.flatten(), (torch.tensor([10.0, 20, 30, 40]) - 25) / 12.909944)
