"""Exercise 5: the projection head, MLP -> l2 normalisation -> weight-normalised prototypes (paper Sec. 3.1
"Network architecture", App. "Projection head", Table 14).

Write the two functions below; they replace the `forward` of WeightNormLinear and of DINOHead in head.py (read
their __init__ for the attributes).
Check them:  python -m pytest --exercise head
"""
import torch
import torch.nn.functional as F


def weight_norm_forward(self, x):
    """The last layer: scores against K prototypes of norm g_k. Replaces `head.WeightNormLinear.forward`.

    Shapes:
        x              (B, D)  the l2-normalised bottleneck features z (D = 256 in the paper)
        self.weight_v  (K, D)  the directions v_k of the K prototypes (any norm)
        self.weight_g  (K, 1)  their gains g_k (fixed to 1 with norm_last_layer)
        returns        (B, K)  x @ W^T, no bias

    Weight normalisation (Salimans & Kingma 2016), row by row:   w_k = g_k · v_k / ||v_k||_2
    Hint: norm over dim 1 with keepdim=True broadcasts over the rows; F.linear(x, W) is x @ W^T.
    """
    raise NotImplementedError


def forward(self, x):
    """The DINO head: g(x) = W · l2norm(MLP(x)). Replaces `head.DINOHead.forward`.

    Shapes:
        x         (B, in_dim)  [CLS] features of the backbone
        self.mlp               the 3-layer MLP (GELU, hidden 2048) down to the bottleneck: (B, in_dim) -> (B, 256)
        self.last_layer        the weight-normalised layer above: (B, 256) -> (B, K)
        returns   (B, K)       logits; no softmax here, the loss applies the temperatures

        z = MLP(x) / ||MLP(x)||_2        (per row)
        g = last_layer(z)

    With norm_last_layer (g_k = 1) every output is the cosine between z and a unit prototype, in [-1, 1].
    Hint: F.normalize(t, dim=-1) divides each row by its norm (safely for a zero row).
    """
    raise NotImplementedError
