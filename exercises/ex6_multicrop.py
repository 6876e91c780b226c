"""Exercise 6: multi-crop, every view through one network, the teacher seeing only the global views (paper Sec. 3.1
"Multi-crop", App.; Caron et al. 2020).

Write `forward` below; it replaces `MultiCropWrapper.forward` of train.py, the network g = head(backbone(·)) that
both the student and the teacher are. train.py calls it as
    teacher_output = teacher(crops[:2])                   # (2·B, K): the teacher sees the 2 global views only
    student_output, features = student(crops, return_features=True,   # (V·B, K): the student sees all V views
                                       drop_ratio=...)                # --patch_drop's share this epoch
(V = 2 + local_crops_number; the features feed the optional KoLeo term, --koleo_weight).
Check it:  python -m pytest --exercise multicrop
"""
import torch


def forward(self, crops, return_features=False, drop_ratio=0.0):
    """All the views of a batch through backbone and head. Replaces `train.MultiCropWrapper.forward`.

    Shapes:
        crops        list of V tensors, crops[v] (B, 3, H_v, W_v): view v of the B images; the global views come
                     first (e.g. 2 x 224 px), then the local ones (e.g. 8 x 96 px)
        self.backbone          the ViT: (n, 3, H, W) -> (n, D) [CLS] features, for any H, W of its patch grid
        self.head              the DINO head: (n, D) -> (n, K)
        returns      (V·B, K)  stacked view by view: rows v·B ... v·B+B-1 are view v (the order the loss reads);
                     with return_features, the pair (that, the (V·B, D) backbone features in the same order)
        drop_ratio   a speed lever (--patch_drop), not the paper's (0: off): when > 0, the 2 global views go
                     through self.backbone(x, drop_ratio=drop_ratio) in a call of their own (it drops that share
                     of their patch tokens), the other views as usual

    Speed: call the backbone once per run of consecutive views of the same size (torch.cat them along the batch:
    2 calls for globals + locals, not V), and the head once on all the features. Tests count the calls and check
    which views drop patches.
    Hint: crops[i].shape[-2:] is (H, W).
    """
    raise NotImplementedError
