"""Vision Transformer backbone for DINO (paper Sec. 3.2 "Vision Transformer", Dosovitskiy et al. 2021).

An image is cut into P x P patches, each linearly embedded; a learned [CLS] token is prepended, learned position
embeddings are added, and a stack of pre-norm Transformer blocks follows. The output of the network is the [CLS]
token after the final LayerNorm: that is the image feature DINO trains and k-NN evaluates.

The parameter names are exactly those of the official code, so released DINO weights load strictly:
    cls_token, pos_embed, patch_embed.proj.*, blocks.{i}.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2.*, norm.*

    model = vit_small(patch_size=16)
    load_pretrained_weights(model, "dino_deitsmall16_pretrain.pth")
    model = released("dino_vits16")                # the same, fetched into torch.hub's cache on first use
    features = model(images)                       # (B, 384)
    attn = model.get_last_selfattention(images)    # (B, 6, 1+N, 1+N)

A ResNet backbone (the paper's ResNet-50, Table 2) is torchvision's, with `fc = nn.Identity()` as in the official
code: `backbone("resnet50")` gives its (B, 2048) pooled feature, and every function below builds and loads either.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from checkpoint import (CheckpointError, backbone_state_dict, check_released, load_backbone,  # noqa: F401
                        load_pretrained_weights, load_released, released_path, training_args)  # (DESIGN.md §2)


def drop_path(x, drop_prob, training):
    """Stochastic depth: drop the whole residual branch for a random subset of samples (rescaled to keep the mean)."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)  # (B, 1, 1)
    return x * mask / keep_prob


def drop_patches(x, ratio):
    """Keep the [CLS] token and a random (1 - ratio) of the patch tokens of each image, the same number in every
    image (Masked Siamese Networks, Assran et al. 2022): the student sees less of its global views at less cost.
    Tokens already carry their position embedding, and attention ignores their order. (B, 1+N, D) -> (B, 1+n, D)."""
    B, N, D = x.shape[0], x.shape[1] - 1, x.shape[2]
    n_keep = max(1, round(N * (1 - ratio)))
    keep = torch.rand(B, N, device=x.device).argsort(dim=1)[:, :n_keep] + 1  # (B, n_keep) random patch indices
    keep = torch.cat((keep.new_zeros(B, 1), keep), dim=1)  # (B, 1+n_keep): [CLS] first
    return x.gather(1, keep.unsqueeze(-1).expand(-1, -1, D))


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, return_attention=False):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, C/heads)
        # The fused kernel computes the same maths without materialising the (N, N) matrix. On CPU under bf16
        # autocast its backward is 2-7x slower than the explicit product for these short sequences (AMD and Intel
        # AMX CPUs), while its forward is as fast or faster (Intel AMX; `benchmark.py --attention`, lab/notes/speed.md):
        # so the matrix is written out there when a backward will follow (the student), and SDPA runs the
        # forward-only calls (the teacher, evaluation). It is also written out when the maps are wanted (Fig. 3).
        backward_follows = torch.is_grad_enabled() and x.requires_grad
        if return_attention or (x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and backward_follows):
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # softmax(q k^T / sqrt(d)): (B, h, N, N)
            if return_attention:
                return attn
            x = attn @ v  # (B, heads, N, C/heads)
        else:
            x = F.scaled_dot_product_attention(q, k, v)  # fused kernel, same maths
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()  # exact (erf) GELU, as the official code
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm Transformer block: x + Attn(LN(x)), then x + MLP(LN(x)), each branch with drop-path."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x):
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)
        return x


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping patches and embed each linearly (a strided convolution does both)."""

    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H/P, W/P) -> (B, N, D)


class VisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, drop_path_rate=0.0):
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        num_patches = (img_size // patch_size) ** 2  # pos_embed is stored for this grid, interpolated for others
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()  # drop-path rises linearly with depth
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, dpr[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, npatch, h, w):
        """Position embeddings for an h x w input: bicubic resize of the stored grid (official semantics).

        The +0.1 offset and `scale_factor` (rather than `size`) reproduce the official code bit for bit, so
        released weights give the official features at any input size, square or not.
        """
        N = self.pos_embed.shape[1] - 1
        if npatch == N and h == w:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        dim, side = self.pos_embed.shape[-1], math.sqrt(N)
        h0, w0 = h // self.patch_size + 0.1, w // self.patch_size + 0.1
        patch_pos = F.interpolate(
            patch_pos.reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2),  # (1, D, side, side)
            scale_factor=(h0 / side, w0 / side), mode="bicubic")
        assert patch_pos.shape[-2:] == (int(h0), int(w0))
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)  # (1, h0*w0, D)
        return torch.cat((cls_pos, patch_pos), dim=1)  # (1, 1+N', D)

    def prepare_tokens(self, x):
        B, _, h, w = x.shape
        x = self.patch_embed(x)  # (B, N, D)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)  # (B, 1+N, D)
        return x + self.interpolate_pos_encoding(x.shape[1] - 1, h, w)

    def forward(self, x, drop_ratio=0.0):
        x = self.prepare_tokens(x)
        if drop_ratio:  # a speed lever, not the paper's, off in both presets (docs/cpu_recipe.md)
            x = drop_patches(x, drop_ratio)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]  # (B, D): the [CLS] token

    def get_last_selfattention(self, x):
        """Attention of the last block, (B, heads, 1+N, 1+N); row 0 is the [CLS] query (Fig. 3)."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        last = self.blocks[-1]
        return last.attn(last.norm1(x), return_attention=True)

    def get_intermediate_layers(self, x, n=1):
        """The normed tokens (B, 1+N, D) of the last n blocks (used by linear evaluation)."""
        x = self.prepare_tokens(x)
        out = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if len(self.blocks) - i <= n:
                out.append(self.norm(x))
        return out


def vit_tiny(patch_size=16, **kw):  # keyword overrides (e.g. depth=6 for a quick CPU model) take precedence
    return VisionTransformer(**{"patch_size": patch_size, "embed_dim": 192, "depth": 12, "num_heads": 3, **kw})


def vit_small(patch_size=16, **kw):
    return VisionTransformer(**{"patch_size": patch_size, "embed_dim": 384, "depth": 12, "num_heads": 6, **kw})


def vit_base(patch_size=16, **kw):
    return VisionTransformer(**{"patch_size": patch_size, "embed_dim": 768, "depth": 12, "num_heads": 12, **kw})


ARCHS = {"vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base}
RESNETS = [n for n in torchvision.models.resnet.__all__ if n.islower()]  # resnet18, ..., resnet50, ..., resnext...


def resnet(arch, **kw):
    """torchvision's ResNet `arch`, untrained, with fc = nn.Identity() (official main_dino.py): its output is the
    average-pooled feature of the last stage, (B, 2048) for resnet50; `embed_dim` is that width (the head's input)."""
    model = torchvision.models.get_model(arch, weights=None, **kw)
    model.embed_dim = model.fc.in_features
    model.fc = nn.Identity()
    return model


def backbone(arch, patch_size=16, **kw):
    """A ViT of ARCHS (keywords: depth, img_size, drop_path_rate) or a ResNet of RESNETS, which has none of them
    (official: a convnet is built as torchvision builds it, with no drop-path)."""
    return resnet(arch) if arch in RESNETS else ARCHS[arch](patch_size=patch_size, **kw)


def describe(saved):
    """'vit_small/16, 12 blocks' or 'resnet50': the network that training args describe, for the scripts' output."""
    if saved["arch"] in RESNETS:
        return saved["arch"]
    depth = saved.get("depth") or 12
    return f"{saved['arch']}/{saved['patch_size']}, {depth} block{'s' if depth != 1 else ''}"


def refuse_resnet(arch, needs):
    """The evaluations that read a ViT's attention or patch tokens answer a ResNet with one line (CheckpointError)."""
    if arch in RESNETS:
        raise CheckpointError(f"{arch} is a convnet: this evaluation needs a ViT's {needs}; evaluate a ResNet with "
                              "eval_knn.py, eval_linear.py or eval_retrieval.py")


# ============ weights from a file (the file handling lives in checkpoint.py) ============
def from_checkpoint(path, arch=None, patch_size=None, checkpoint_key="teacher", vit_needed=None):
    """The backbone that `path` was trained with, its weights loaded. Returns (model, the training args used).

    A bare released backbone file has no args: then `arch` (and for a ViT `patch_size`) must be given (explicit
    values win). `vit_needed`: what a ViT-only evaluation reads (refuse_resnet), checked before any weights load."""
    saved = training_args(path, arch, patch_size)
    if saved["arch"] not in ARCHS and saved["arch"] not in RESNETS:
        raise CheckpointError(f"unknown architecture '{saved['arch']}' (choose from {', '.join(ARCHS)} or a "
                              f"torchvision ResNet: {', '.join(RESNETS)})")
    if vit_needed:
        refuse_resnet(saved["arch"], vit_needed)
    model = build_like(saved)
    load_pretrained_weights(model, path, checkpoint_key)
    return model, saved


def build_like(saved):
    """A fresh backbone of the shape that training args describe: arch, and for a ViT patch size, depth, stored
    pos-embed grid."""
    shape = {"depth": saved["depth"]} if saved.get("depth") else {}
    if saved.get("global_size"):
        shape["img_size"] = saved["global_size"]  # the stored pos_embed grid (other sizes are interpolated)
    return backbone(saved["arch"], patch_size=int(saved["patch_size"] or 16), **shape)


def released(name, pretrained=True, progress=True, **kw):
    """The network of released DINO `name` (dino_vits16, dino_vits8, dino_vitb16, dino_vitb8, dino_resnet50:
    checkpoint.RELEASED) with its weights from torch.hub's cache, downloaded on first use; untrained with
    pretrained=False (hubconf.py). `kw` go to the ViT's or torchvision's constructor."""
    arch, patch_size, _ = check_released(name)
    model = resnet(arch, **kw) if arch in RESNETS else ARCHS[arch](patch_size=patch_size, **kw)
    if pretrained:
        load_backbone(model, backbone_state_dict(load_released(name, progress)), released_path(name))
    return model


def from_args(args, vit_needed=None):
    """The model a script's command line names: `args.pretrained` (a released name) or `args.checkpoint` (a file,
    with `args.arch`, `args.patch_size`, `args.checkpoint_key`). Returns (model, training args as from_checkpoint).
    `vit_needed`: what a ViT-only evaluation reads; a ResNet is then refused in one line (refuse_resnet)."""
    if args.pretrained and args.checkpoint:
        raise ValueError(f"give a checkpoint or --pretrained, not both ({args.checkpoint}, {args.pretrained})")
    if args.pretrained:
        arch, patch_size, _ = check_released(args.pretrained)
        if vit_needed:
            refuse_resnet(arch, vit_needed)
        model = released(args.pretrained)
        return model, {"arch": arch, "patch_size": patch_size, "depth": len(getattr(model, "blocks", ()))}
    if not args.checkpoint:
        raise ValueError("a checkpoint is required: a file, or --pretrained NAME for released weights")
    return from_checkpoint(args.checkpoint, args.arch, args.patch_size, args.checkpoint_key, vit_needed)
