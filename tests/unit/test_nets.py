import subprocess
import sys

import pytest
import torch

from ebm.config import Config
from ebm.nets import EnergyHead, build_model
from ebm.resnet import resnet_for

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("circular", [(False,), (True, False, True)])
def test_split_first_layer_equals_concatenated_layer(circular):
    D = len(circular)
    head = EnergyHead(32, D, circular, [16, 32, 64, 128], 64, residual_blocks=1)
    h, y = torch.randn(5, 32), torch.randn(5, 33, D)
    torch.testing.assert_close(head(h, y), head.forward_concat(h, y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("blocks", [0, 1])
def test_scores_of_shared_points_equal_the_per_example_scores(blocks):
    """score_shared (the grid's y-terms once for all examples) and scores_on_grid's chunking give the
    numbers of score() on the grid repeated per example, for a joint model and a teacher pair."""
    from ebm import metrics as M
    torch.manual_seed(0)
    head = EnergyHead(32, 1, (True,), [16, 32, 64, 128], 64, residual_blocks=blocks)
    h, grid = torch.randn(7, 32), torch.linspace(0, 6.28, 300).unsqueeze(1)
    with torch.no_grad():
        per_example = head(h, grid.unsqueeze(0).expand(7, -1, -1))
        torch.testing.assert_close(head.forward_shared(h, grid), per_example, rtol=1e-6, atol=1e-6)
    cfg = Config.from_dict({"task": {"name": "toy2"}, "energy": {"residual_blocks": blocks}})
    for method in ("ebm_learned_proposal", "mdn_ebm_teacher"):
        cfg.method.name = method
        model = build_model(cfg, x_shape=(1,), D=1, circular=(False,)).eval()
        x, g = torch.randn(9, 1), torch.linspace(-3, 3, 1000).unsqueeze(1)
        with torch.no_grad():
            enc = model.encode(x)
            want = model.score(enc, g.unsqueeze(0).expand(9, -1, -1))
            for chunk in (None, 64, 1000):
                torch.testing.assert_close(M.scores_on_grid(model, enc, g, chunk=chunk), want, rtol=1e-6, atol=1e-6)


def test_circular_dims_make_the_energy_periodic():
    head = EnergyHead(8, 2, (True, False), [10, 10], 10, 1)
    h, y = torch.randn(3, 8), torch.randn(3, 4, 2)
    shifted = y + torch.tensor([2 * torch.pi, 0.0])
    torch.testing.assert_close(head(h, y), head(h, shifted), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind,width,feat", [("resnet18", 64, 512), ("resnet_slim", 16, 128)])
def test_resnets_give_pooled_features(kind, width, feat):
    net = resnet_for(kind, 3, width)
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, feat)
    assert net.out_dim == feat


def test_resnet18_has_the_standard_parameter_count():
    net = resnet_for("resnet18", 3, 64)
    # torchvision's resnet18 has 11,689,512 parameters, of which fc holds 513,000
    assert sum(p.numel() for p in net.parameters()) == 11_689_512 - 513_000


def test_image_model_builds_with_paper_heads():
    cfg = Config.from_dict({"features": {"kind": "resnet_slim", "width": 8},
                            "energy": {"y_embed": [16, 32, 64, 128], "hidden": 512, "residual_blocks": 0},
                            "proposal": {"K": 8}})
    model = build_model(cfg, (1, 32, 32), 1, (True,))
    enc = model.encode(torch.randn(3, 1, 32, 32))
    assert model.score(enc, torch.rand(3, 10, 1)).shape == (3, 10)
    mix = model.propose(enc)
    assert mix.means.shape == (3, 8, 1) and mix.logits.shape == (3, 8)


def test_toy_mlp_rejects_image_inputs():
    with pytest.raises(ValueError, match="toy_mlp"):
        build_model(Config(), (3, 64, 64), 1, (False,))


def test_importing_ebm_pulls_in_no_ray_mlflow_pyarrow_scipy_pil():
    code = ("import sys, ebm, ebm.loop, ebm.checkpoint, ebm.data, ebm.evaluate, ebm.metrics, ebm.predict, ebm.steps, ebm.nets, ebm.tasks;"
            "bad = [m for m in ('ray', 'mlflow', 'pyarrow', 'scipy', 'PIL') if m in sys.modules];"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("blocks", [0, 1])
def test_fused_head_gradients_equal_the_concatenated_form(blocks):
    torch.manual_seed(0)
    head = EnergyHead(12, 2, (False, True), [8, 16], 24, residual_blocks=blocks).double()
    h = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 7, 2, dtype=torch.float64)
    gf = torch.randn(3, 7, dtype=torch.float64)
    grads = []
    for fn in (head.forward, head.forward_concat):
        head.zero_grad()
        h.grad = None
        out = fn(h, y)
        (out * gf).sum().backward()
        grads.append((out.detach(), h.grad.clone(), [p.grad.clone() for p in head.parameters()]))
    (o1, gh1, gp1), (o2, gh2, gp2) = grads
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(gh1, gh2)
    for a, b in zip(gp1, gp2):
        torch.testing.assert_close(a, b)
