"""torch.hub entry points: released DINO backbones as this repository's `vit.VisionTransformer`.

The same names and the same weights as the official hubconf.py (facebookresearch/dino), so either gives the features
of the paper's models in one line; the weights go through torch.hub's cache ($TORCH_HOME/hub/checkpoints/), where a
file already present is used without network:

    model = torch.hub.load("/path/to/this/checkout", "dino_vits16", source="local")   # or "<owner>/<repo>" on GitHub
    features = model(images)                                                           # (B, 384) [CLS]

`dino_resnet50` is torchvision's resnet50 with `fc = nn.Identity()` (features (B, 2048)), as the official entry. The
official XCiT entries are not here: they need the XCiT model code.
"""
import vit

dependencies = ["torch", "torchvision"]

# Keyword arguments of the official VisionTransformer that ours has no use for, with the only value it supports
# (the released models' own): `dino_vits16(num_classes=0)` works as with the official hubconf.py.
OFFICIAL_ONLY = {"num_classes": 0, "qkv_bias": True, "qk_scale": None, "drop_rate": 0.0, "attn_drop_rate": 0.0}


def _vit_kwargs(kwargs):
    """The official entry points' keyword arguments, as our `vit.VisionTransformer` takes them."""
    for name, value in OFFICIAL_ONLY.items():
        if name in kwargs and kwargs.pop(name) != value:
            raise ValueError(f"{name}={value!r} is the only value supported here")
    if isinstance(kwargs.get("img_size"), (list, tuple)):  # official: img_size=[224]
        kwargs["img_size"] = kwargs["img_size"][0]
    return kwargs


def dino_vits16(pretrained=True, **kwargs):
    """ViT-S/16 trained with DINO: 74.5% k-NN, 77.0% linear top-1 on ImageNet."""
    return vit.released("dino_vits16", pretrained, **_vit_kwargs(kwargs))


def dino_vits8(pretrained=True, **kwargs):
    """ViT-S/8 trained with DINO: 78.3% k-NN, 79.7% linear top-1 on ImageNet."""
    return vit.released("dino_vits8", pretrained, **_vit_kwargs(kwargs))


def dino_vitb16(pretrained=True, **kwargs):
    """ViT-B/16 trained with DINO: 76.1% k-NN, 78.2% linear top-1 on ImageNet."""
    return vit.released("dino_vitb16", pretrained, **_vit_kwargs(kwargs))


def dino_vitb8(pretrained=True, **kwargs):
    """ViT-B/8 trained with DINO: 77.4% k-NN, 80.1% linear top-1 on ImageNet."""
    return vit.released("dino_vitb8", pretrained, **_vit_kwargs(kwargs))


def dino_resnet50(pretrained=True, **kwargs):
    """ResNet-50 trained with DINO: 67.5% k-NN, 75.3% linear top-1 on ImageNet (the linear layer replaces `fc`)."""
    return vit.released("dino_resnet50", pretrained, **kwargs)
