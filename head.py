"""The DINO projection head (paper Sec. 3.1 "Network architecture", App. "Projection head").

    g(x) = W_K · l2norm( MLP(x) )

a 3-layer MLP (hidden 2048, GELU) down to a 256-d bottleneck, L2 normalisation, then a weight-normalised linear
layer to K output dimensions ("prototypes"). With `norm_last_layer=True` the weight-norm gain g is fixed to 1, so
every output is a cosine similarity between the bottleneck feature and one of K unit vectors; the paper found this
stabilises training (App. Table 14). The backbone and this head together are "the network g" of Eq. 1.

Weight normalisation keeps its own two parameters, `weight_g` and `weight_v` (computed with torch's fused kernel,
the one nn.utils.weight_norm calls), rather than going through torch's weight-norm utilities, whose API changed
across versions: the parameter names are those of the official checkpoints (`last_layer.weight_g`,
`last_layer.weight_v`), which therefore load as they are.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class WeightNormLinear(nn.Module):
    """Linear layer without bias whose weight rows are w_k = g_k · v_k / ||v_k|| (Salimans & Kingma, 2016)."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's default init, as official
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))  # gain 1: unit-norm prototypes

    def forward(self, x):
        # w_k = g_k · v_k / ||v_k||  (torch's fused kernel, the one nn.utils.weight_norm calls: one pass over V)
        weight = torch._weight_norm(self.weight_v, self.weight_g, 0)  # (K, bottleneck)
        return F.linear(x, weight)


class DINOHead(nn.Module):
    def __init__(self, in_dim, out_dim, use_bn=False, norm_last_layer=True, nlayers=3, hidden_dim=2048,
                 bottleneck_dim=256):
        super().__init__()
        nlayers = max(nlayers, 1)
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers = []
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:  # no norm/activation after the bottleneck projection
                if use_bn:
                    layers.append(nn.BatchNorm1d(dims[i + 1]))
                layers.append(nn.GELU())
        self.mlp = layers[0] if nlayers == 1 else nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False  # keep ||w_k|| = 1 for ever

    def forward(self, x):
        x = self.mlp(x)  # (B, bottleneck)
        # z = x / ||x||_2
        x = F.normalize(x, dim=-1, p=2)
        # logits_k = <w_k, z>  (K "prototype" scores; no softmax here, the loss applies the temperatures)
        return self.last_layer(x)  # (B, K)
