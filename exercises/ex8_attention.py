"""Exercise 8: the masks of Fig. 4, the patches that hold 60% of a [CLS] attention map's mass (paper Sec. 4.2.2).

Write `mass_mask` below; it replaces `mass_mask` of visualize_attention.py (its masks and its Jaccard use it).
Check it:  python -m pytest --exercise attention
"""
import torch


def mass_mask(attn, threshold=0.6):
    """Keep the top patches that hold `threshold` of each map's attention mass. Replaces
    `visualize_attention.mass_mask`.

    Shapes:
        attn       (..., h, w)  non-negative attention of the [CLS] query to each patch of an h x w grid, one map per
                                leading index (e.g. (heads, h, w)); a map need not sum to 1: mass is relative to its sum
        threshold  float in (0, 1]
        returns    (..., h, w)  bool, True for the patches kept

    Rule (the official code): sort a map's values in increasing order, take the cumulative sum divided by the total,
    keep a patch when that fraction is > 1 - threshold. So the kept set is the smallest set of top patches holding at
    least `threshold` of the mass; with equal values, the one later in the (stable) sort ranks higher.
    Example: [0.5, 0.25, 0.15, 0.1] with threshold 0.6 keeps [True, True, False, False] (0.75 of the mass).
    Hints: flatten(-2) the grid, sort(dim=-1, stable=True) returns values and the indices to put them back with
    scatter_(-1, indices, ...); cumsum(-1); reshape back at the end.
    """
    raise NotImplementedError
