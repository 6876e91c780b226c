"""vit.py: shapes, attention, pos-embed interpolation, official key layout, checkpoint loading (Sec. 3.2)."""
import argparse

import pytest
import torch
import torch.nn.functional as F

import vit


def tiny(patch=8, img_size=32, depth=2, **kw):
    torch.manual_seed(0)
    return vit.VisionTransformer(img_size=img_size, patch_size=patch, embed_dim=48, depth=depth, num_heads=3, **kw)


@pytest.mark.parametrize("h,w", [(32, 32), (48, 48), (16, 16), (40, 56)])
def test_forward_gives_one_cls_feature_per_image_at_any_resolution(h, w):
    model = tiny().eval()
    assert model(torch.randn(2, 3, h, w)).shape == (2, 48)
    attn = model.get_last_selfattention(torch.randn(2, 3, h, w))
    n = 1 + (h // 8) * (w // 8)
    assert attn.shape == (2, 3, n, n)


def test_pos_embed_interpolation_is_the_identity_at_the_native_size():
    model = tiny()
    assert model.interpolate_pos_encoding(16, 32, 32) is model.pos_embed


def test_pos_embed_interpolation_of_a_constant_field_stays_constant_and_has_the_new_grid():
    model = tiny()
    with torch.no_grad():
        model.pos_embed.fill_(0.5)
    pe = model.interpolate_pos_encoding(5 * 7, 40, 56)  # 5 x 7 patches
    assert pe.shape == (1, 1 + 35, 48)
    torch.testing.assert_close(pe, torch.full_like(pe, 0.5))


def test_attention_rows_sum_to_one():
    attn = tiny().eval().get_last_selfattention(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]))
    assert (attn >= 0).all()


def test_fused_attention_path_equals_explicit_softmax_attention():
    blk = tiny().blocks[0].attn
    x = torch.randn(2, 17, 48)
    attn = blk(x, return_attention=True)  # explicit softmax(q k^T / sqrt(d))
    B, N, C = x.shape
    v = blk.qkv(x).reshape(B, N, 3, 3, C // 3).permute(2, 0, 3, 1, 4)[2]
    explicit = blk.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(blk(x), explicit, atol=1e-5, rtol=1e-5)


def test_intermediate_layers_are_normed_tokens_and_the_last_cls_is_the_feature():
    model = tiny(depth=3).eval()
    x = torch.randn(2, 3, 32, 32)
    layers = model.get_intermediate_layers(x, 2)
    assert len(layers) == 2 and layers[0].shape == (2, 17, 48)
    torch.testing.assert_close(layers[-1][:, 0], model(x))


def test_state_dict_keys_are_exactly_the_official_ones():
    keys = set(vit.vit_small(patch_size=16).state_dict())
    block = {f"blocks.0.{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
             for p in ("weight", "bias")}
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                "norm.bias"} | {k.replace("blocks.0", f"blocks.{i}") for k in block for i in range(12)}
    assert keys == expected
    assert vit.vit_small().pos_embed.shape == (1, 197, 384) and vit.vit_base(8).embed_dim == 768


def test_init_is_truncated_normal_with_std_002_and_layernorm_identity():
    model = vit.vit_small()
    assert abs(model.blocks[0].mlp.fc1.weight.std().item() - 0.02) < 1e-3
    assert model.blocks[0].mlp.fc1.bias.abs().max() == 0
    assert (model.norm.weight == 1).all() and model.norm.eps == 1e-6


def test_drop_path_rises_with_depth_and_acts_only_in_training():
    model = tiny(depth=4, drop_path_rate=0.3)
    assert [b.drop_path for b in model.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))


def save_layouts(tmp_path, model):
    sd = model.state_dict()
    released = tmp_path / "released.pth"
    torch.save(sd, released)
    official = tmp_path / "official.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in sd.items()} | {"head.mlp.0.weight": torch.zeros(2)},
                "student": {f"module.backbone.{k}": v * 0 for k, v in sd.items()},
                "args": argparse.Namespace(arch="vit_small", patch_size=8), "epoch": 3}, official)
    ours = tmp_path / "ours.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in sd.items()}, "args": {"arch": "vit_tiny"}}, ours)
    return released, official, ours


def test_patch_dropping_keeps_cls_first_and_the_same_number_of_distinct_patches_in_every_image():
    x = torch.randn(1, 1 + 64, 8).expand(5, -1, -1)  # (B, 1+N, D): 5 copies of one image's tokens
    kept = vit.drop_patches(x, 0.75)
    assert kept.shape == (5, 1 + 16, 8)
    assert torch.equal(kept[:, 0], x[:, 0])  # [CLS] kept, first
    chosen = []
    for b in range(5):  # each kept token is one of the image's own patches, none twice
        rows = {int(torch.nonzero((x[b, 1:] == t).all(-1))[0]) for t in kept[b, 1:]}
        assert len(rows) == 16
        chosen.append(rows)
    assert len({frozenset(r) for r in chosen}) > 1  # each image draws its own subset
    model = vit.vit_tiny(patch_size=8, depth=1, img_size=32)
    assert model(torch.randn(2, 3, 32, 32), drop_ratio=0.5).shape == (2, 192)


def test_load_pretrained_weights_reads_released_official_and_our_layouts(tmp_path):
    src = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    for path in save_layouts(tmp_path, src):
        dst = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3).eval()
        vit.load_pretrained_weights(dst, path)
        torch.testing.assert_close(dst(x), src(x))


def test_load_pretrained_weights_keeps_a_pos_embed_trained_at_another_resolution(tmp_path):
    src = tiny(img_size=64).eval()
    torch.save(src.state_dict(), tmp_path / "w.pth")
    dst = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3).eval()
    vit.load_pretrained_weights(dst, tmp_path / "w.pth")
    x = torch.randn(1, 3, 48, 48)
    torch.testing.assert_close(dst(x), src(x))


def test_a_checkpoint_that_does_not_fit_names_the_mismatch(tmp_path):
    torch.save(tiny().state_dict(), tmp_path / "w.pth")
    with pytest.raises(vit.CheckpointError, match="shape"):
        vit.load_pretrained_weights(vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=96, depth=2,
                                                          num_heads=3), tmp_path / "w.pth")
    with pytest.raises(vit.CheckpointError, match="missing"):
        vit.load_pretrained_weights(tiny(depth=3), tmp_path / "w.pth")


def test_a_file_that_is_not_a_checkpoint_gives_one_clear_line(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(vit.CheckpointError, match="not a readable PyTorch checkpoint") as e:
        vit.load_pretrained_weights(tiny(), tmp_path / "notes.txt")
    assert "\n" not in str(e.value)
    with pytest.raises(vit.CheckpointError, match="not found"):
        vit.load_pretrained_weights(tiny(), tmp_path / "missing.pth")
