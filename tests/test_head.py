"""head.py: 3-layer MLP -> L2 norm -> weight-normalised prototypes (Sec. 3.1 "Network architecture")."""
import torch
import torch.nn.functional as F

from head import DINOHead


def test_with_norm_last_layer_each_output_is_a_cosine_to_a_unit_prototype():
    torch.manual_seed(0)
    head = DINOHead(32, 100, hidden_dim=64, bottleneck_dim=16)
    x = torch.randn(8, 32)
    out = head(x)
    z = F.normalize(head.mlp(x), dim=-1)
    prototypes = F.normalize(head.last_layer.weight_v, dim=-1)
    torch.testing.assert_close(out, z @ prototypes.T)
    assert out.shape == (8, 100) and out.abs().max() <= 1 + 1e-6


def test_a_free_gain_scales_each_prototype_row_by_its_own_g():
    # w_k = g_k · v_k / ||v_k||: the norm is taken per output row, whatever kernel computes it
    torch.manual_seed(0)
    head = DINOHead(32, 10, norm_last_layer=False, hidden_dim=64, bottleneck_dim=16)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 3.0)
    z = F.normalize(torch.randn(4, 16), dim=-1)
    w = head.last_layer.weight_g * F.normalize(head.last_layer.weight_v, dim=-1)  # (10, 16)
    torch.testing.assert_close(head.last_layer(z), z @ w.T)


def test_norm_last_layer_freezes_the_gain_and_only_that():
    frozen = DINOHead(32, 10, norm_last_layer=True)
    free = DINOHead(32, 10, norm_last_layer=False)
    assert not frozen.last_layer.weight_g.requires_grad and frozen.last_layer.weight_v.requires_grad
    assert free.last_layer.weight_g.requires_grad


def test_mlp_layout_and_weight_norm_keys_match_the_official_checkpoints():
    keys = set(DINOHead(384, 65536).state_dict())
    assert keys == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias",
                    "last_layer.weight_g", "last_layer.weight_v"}
    assert DINOHead(384, 10).state_dict()["last_layer.weight_g"].shape == (10, 1)
    assert set(DINOHead(8, 4, nlayers=1).state_dict()) == {"mlp.weight", "mlp.bias", "last_layer.weight_g",
                                                          "last_layer.weight_v"}


def test_official_weight_g_and_weight_v_load_and_define_w_equals_g_v_over_norm_v():
    torch.manual_seed(1)
    head = DINOHead(16, 5, hidden_dim=32, bottleneck_dim=8)
    sd = head.state_dict()
    sd["last_layer.weight_g"] = torch.rand(5, 1) + 0.5
    sd["last_layer.weight_v"] = torch.randn(5, 8)
    head.load_state_dict(sd, strict=True)
    z = torch.randn(3, 8)
    w = sd["last_layer.weight_g"] * sd["last_layer.weight_v"] / sd["last_layer.weight_v"].norm(dim=1, keepdim=True)
    torch.testing.assert_close(head.last_layer(z), z @ w.T)
