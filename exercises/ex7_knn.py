"""Exercise 7: the weighted k-NN classifier that measures DINO's features without training anything (paper Sec. 3.2
"Evaluation protocols"; Wu et al. 2018).

Write `knn_classifier` below; it replaces `knn_classifier` of eval_knn.py (used by eval_knn.py and by train.py's
online monitor: with `--exercise knn` the k-NN numbers train.py prints are yours).
Check it:  python -m pytest --exercise knn
"""
import torch


@torch.no_grad()
def knn_classifier(train_features, train_labels, test_features, test_labels, k, T, num_classes=None, chunk_size=100):
    """Top-1 and top-5 accuracy of the weighted k-NN vote, in percent. Replaces `eval_knn.knn_classifier`.

    Shapes:
        train_features (N, D), test_features (M, D)   L2-normalised rows (so a dot product is a cosine similarity)
        train_labels (N,), test_labels (M,)            class indices (long)
        k int, T float (0.07), num_classes int or None (None: 1 + the largest label seen)
        chunk_size                                      test images at a time (memory O(chunk_size · N))
        returns (top1, top5)                            floats, percent of the M test images

    For each test image x:
        s_j   = <x, f_j>                             cosine similarity to every training feature f_j
        N_k   = the k training images with the largest s_j     (all of them if N < k)
        vote_c = Σ_{j ∈ N_k, y_j = c} exp(s_j / T)   each neighbour votes for its class with weight exp(s/T)
    Top-1 is right when the class with the largest vote is the true one. Top-5 is right when the true class is among
    the first min(5, k, num_classes) classes ranked by vote (with k < 5 at most k classes have a vote). Rank classes
    with equal votes (e.g. no vote) in class order (a stable sort), so results are reproducible.
    Small T trusts the nearest neighbour, large T the majority.
    Hints: Tensor.topk(k, dim=1), train_labels[indices], Tensor.scatter_add_(1, index, src),
    torch.sort(..., stable=True).
    """
    raise NotImplementedError
