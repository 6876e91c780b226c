"""Checkpoint files: writing ours atomically, and reading ours, official training checkpoints and released weights.

A training checkpoint of ours (train.py) holds `student`, `teacher`, `optimizer`, `scaler`, `dino_loss`, `epoch`,
`iteration`, `args`, `rng`, `cuda_rng`, `history`, `epoch_sums`. The official main_dino.py saves `student`,
`teacher` (with `module.` prefixes), `optimizer`, `epoch`, `args` (an argparse.Namespace), `dino_loss`; a released
backbone file (dino_deitsmall16_pretrain.pth, ..., dino_resnet50_pretrain.pth) is a bare state dict of the ViT
or of torchvision's ResNet-50 without its `fc`. All three load here:

    save(state, "out/checkpoint.pth")                    # write a temporary file, then rename over the old one
    write_text("out/log.txt", text)                      # the same for any other file a run writes
    load_pretrained_weights(model, path, "teacher")      # strict: a file that does not fit says why, in one line
    saved = training_args(path)                          # {"arch": ..., "patch_size": ..., "depth": ..., ...}
    add_weights_args(parser); run_script(run, args)      # an evaluation script's weight flags; one-line errors

Every file a run writes goes through `write_atomic`: it is written whole or not at all, and a write that fails (full
disk, no permission, read-only file system) removes its temporary file, leaves the old file as it was and raises
WriteError, an OSError whose message names the file and the cause in one line.

Released DINO backbones are also fetched by their torch.hub names (the official hubconf.py's entry points):

    sd = load_released("dino_vits16")   # $TORCH_HOME/hub/checkpoints/dino_deitsmall16_pretrain.pth, downloaded once

The model side (building the ViT that a file was trained with) is vit.from_checkpoint, vit.released and vit.from_args.
"""
import argparse
import contextlib
import http.client
import os
import sys

import torch
import torch.nn as nn


class CheckpointError(ValueError):
    """A file that is not a checkpoint, or one that does not fit the model (one-line message)."""


class WriteError(OSError):
    """A file could not be written: "could not write PATH: CAUSE" (errno is the cause's, e.g. ENOSPC, EACCES)."""

    def __init__(self, path, cause):
        super().__init__(f"could not write {path}: {cause.strerror or cause}")
        self.errno, self.path = cause.errno, path


class _Recording:
    """A binary file that remembers the OSError its write raised: torch.save swallows it and raises a RuntimeError
    ("unexpected pos ...") instead, which says nothing of a full disk."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b):
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self):
        self.f.flush()

    def tell(self):
        return self.f.tell()


def write_atomic(path, write):
    """Write `path` whole or not at all: write(f) fills `{path}.tmp` (a binary file), which is flushed to disk and
    renamed over `path`; the folder is made if missing. On any failure the temporary file is removed and `path` is
    untouched; an OSError (full disk, no permission) is raised as WriteError, other errors as they are."""
    tmp, f = f"{path}.tmp", None
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "wb") as raw:
            f = _Recording(raw)
            write(f)
            raw.flush()
            os.fsync(raw.fileno())  # a full disk may only say so here (NFS, quotas), and a crash keeps whole files
        os.replace(tmp, path)
    except BaseException as e:
        if f is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        cause = e if isinstance(e, OSError) else f.error if f is not None else None
        if cause is None:
            raise
        raise WriteError(path, cause) from None


def save(state, path):
    """torch.save, atomic: a crash or a full disk mid-save keeps the previous file (write_atomic)."""
    write_atomic(path, lambda f: torch.save(state, f))


def write_text(path, text):
    """A text file (UTF-8), atomic (write_atomic)."""
    write_atomic(path, lambda f: f.write(text.encode()))


def load(path):
    """torch.load with weights_only (no arbitrary code); official checkpoints pickle an argparse.Namespace."""
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint path is a directory: {path}") from None
    except Exception as e:  # the unpickler raises many types (UnpicklingError, KeyError, EOFError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        why = f" ({first[:160]})" if len(first) > 8 else ""  # the unpickler's KeyError(101) etc. say nothing useful
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint{why}") from None


def backbone_state_dict(ckpt, checkpoint_key="teacher"):
    """Extract backbone weights from a released file, an official training checkpoint or one of ours."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"expected a state dict, got {type(ckpt).__name__}")
    if checkpoint_key in ckpt and isinstance(ckpt[checkpoint_key], dict):
        ckpt = ckpt[checkpoint_key]
    elif "teacher" in ckpt or "student" in ckpt:
        raise CheckpointError(f"checkpoint has no key '{checkpoint_key}' (it has: {', '.join(map(str, ckpt))})")
    elif isinstance(ckpt.get("model"), dict):  # a fine-tuned network (eval_linear.py --finetune), as DeiT saves it
        ckpt = ckpt["model"]
    sd = {}
    for k, v in ckpt.items():
        if not isinstance(v, torch.Tensor):
            continue
        for prefix in ("module.", "backbone."):
            k = k[len(prefix):] if k.startswith(prefix) else k
        if k.startswith(("head.", "fc.", "linear.")):  # projection/classifier heads are not backbone
            continue
        sd[k] = v
    return sd


def load_pretrained_weights(model, path, checkpoint_key="teacher"):
    """Load backbone weights strictly; a file that does not fit the model raises CheckpointError naming why."""
    return load_backbone(model, backbone_state_dict(load(path), checkpoint_key), path)


def load_backbone(model, sd, path):
    """Load the backbone state dict `sd` (read from `path`, named in the messages) into `model`, strictly."""
    own = model.state_dict()
    if not any(k in own for k in sd):
        raise CheckpointError(f"{path} holds no weights of this backbone (found keys like {list(sd)[:3]})")
    counters = {k: v for k, v in own.items() if k.endswith("num_batches_tracked") and k not in sd}
    sd = {**sd, **counters}  # BatchNorm's count of batches seen: unused in eval, absent from some files
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]} "
                              f"(wrong --arch?)")
    for k, v in sd.items():
        if k == "pos_embed" and v.shape != own[k].shape and v.shape[-1] == own[k].shape[-1]:
            continue  # a different training resolution: the model keeps it (below) and interpolates at run time
        if v.shape != own[k].shape:
            raise CheckpointError(f"{path} does not fit the model: {k} has shape {tuple(v.shape)}, model expects "
                                  f"{tuple(own[k].shape)} (wrong --arch or --patch?)")
    if "pos_embed" in sd and sd["pos_embed"].shape != own["pos_embed"].shape:
        model.pos_embed = nn.Parameter(torch.zeros_like(sd["pos_embed"]))
    model.load_state_dict(sd, strict=True)
    return model


def training_args(path, arch=None, patch_size=None):
    """The training args saved in `path` (a dict), with the arch and patch size to build its network with.

    Our checkpoints and official training checkpoints carry their args (arch, patch_size); a bare released
    backbone file does not, and then `arch` and, for a ViT, `patch_size` must be given. Explicit values win. Our args
    also give the depth and training resolution (a CPU run may train fewer blocks than the paper's 12).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = load(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(ckpt).__name__})")
    saved = ckpt.get("args")
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else dict(saved) if isinstance(saved, dict) else {}
    arch = arch or saved.get("arch")
    patch_size = patch_size or saved.get("patch_size") or saved.get("patch")
    if not arch or (not patch_size and arch.startswith("vit")):  # a ResNet has no patches
        raise CheckpointError(f"{path} has no saved training args (a bare backbone file?): "
                              "pass --arch and --patch, e.g. --arch vit_small --patch 16 (or --arch resnet50)")
    return {**saved, "arch": arch, "patch_size": int(patch_size or 0)}  # the values actually used


def eval_image_size(image_size, saved):
    """--image_size, else the training global crop size (ours saves it; official runs used 224)."""
    return int(image_size or saved.get("global_size") or 224)


# ============ released DINO weights, by their torch.hub names ============
# name -> (arch, patch size, file). The file is served at https://dl.fbaipublicfiles.com/dino/<stem>/<file> and kept
# in torch.hub's cache under its official name, so the official hubconf.py and ours share one download.
RELEASED = {
    "dino_vits16": ("vit_small", 16, "dino_deitsmall16_pretrain.pth"),  # k-NN 74.5%, linear 77.0% (Table 2)
    "dino_vits8": ("vit_small", 8, "dino_deitsmall8_pretrain.pth"),  # k-NN 78.3%, linear 79.7%
    "dino_vitb16": ("vit_base", 16, "dino_vitbase16_pretrain.pth"),  # k-NN 76.1%, linear 78.2%
    "dino_vitb8": ("vit_base", 8, "dino_vitbase8_pretrain.pth"),  # k-NN 77.4%, linear 80.1%
    "dino_resnet50": ("resnet50", None, "dino_resnet50_pretrain.pth"),  # k-NN 67.5%, linear 75.3%
    # no official hub names, but the default weights of two official scripts: visualize_attention.py's (the
    # paper's figures, 300 epochs) and eval_image_retrieval.py's (trained on Google Landmarks v2, Table 3)
    "dino_vits8_300ep": ("vit_small", 8, "dino_deitsmall8_300ep_pretrain.pth"),
    "dino_vits16_gldv2": ("vit_small", 16, "dino_vitsmall16_googlelandmark_pretrain.pth"),
}
PRETRAINED_HELP = (f"released DINO weights instead of a checkpoint: {', '.join(RELEASED)} (architecture and patch "
                   "follow from the name); downloaded once into $TORCH_HOME/hub/checkpoints/ (default "
                   "~/.cache/torch), a file already there is used without network")


def add_weights_args(p, also=""):
    """The flags by which every evaluation script is told which weights to read: CHECKPOINT (ours, an official
    training checkpoint or a released backbone file), or --pretrained NAME; --checkpoint_key, and --arch/--patch for
    a bare backbone file; --random_init, the baseline of the same shape. `also`: what else makes CHECKPOINT
    unnecessary, for its help."""
    p.add_argument("checkpoint", nargs="?", help="our OUT/checkpoint.pth, an official training checkpoint or a "
                   f"released backbone file (then give --arch and --patch); not needed with --pretrained{also}")
    p.add_argument("--pretrained", default=None, metavar="NAME", help=PRETRAINED_HELP)
    p.add_argument("--checkpoint_key", default="teacher", help="which network of a training checkpoint to evaluate: "
                   "'teacher' (as the paper) or 'student' (default: %(default)s)")
    p.add_argument("--arch", default=None, help="vit_tiny, vit_small, vit_base or a torchvision ResNet (resnet50); "
                   "needed only for a bare backbone file")
    p.add_argument("--patch", "--patch_size", dest="patch_size", default=None, type=int,
                   help="patch size (8 or 16); needed only for a bare backbone file")
    p.add_argument("--random_init", action="store_true", help="baseline: an untrained network of the same shape "
                   "instead of the weights (the paper's 'random' rows: what the features owe to training)")


def run_script(run, args, errors=(OSError, ValueError)):
    """`run(args)` of an evaluation script, whose `errors` (a missing file, not a checkpoint, a wrong --arch, a bad
    data folder) are one line on stderr. Returns the exit code: 0, or 2 after such an error."""
    try:
        run(args)
    except errors as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    return 0


def released_url(name):
    file = RELEASED[name][2]
    return f"https://dl.fbaipublicfiles.com/dino/{file[:-len('.pth')]}/{file}"


def released_path(name):
    """Where torch.hub keeps the file: $TORCH_HOME/hub/checkpoints/<official file name>."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", RELEASED[name][2])


def check_released(name):
    if name not in RELEASED:
        raise CheckpointError(f"unknown released model '{name}' (choose from {', '.join(RELEASED)})")
    return RELEASED[name]


def load_released(name, progress=True):
    """The backbone state dict of released model `name`, through torch.hub.load_state_dict_from_url: read from the
    cache if the file is there (no network), else downloaded first (a progress bar on stderr). torch.hub writes a
    temporary file and renames it when complete; a failed download leaves nothing, and a complete one that is not a
    checkpoint (a proxy's error page, say) is removed here. Every failure is a one-line CheckpointError."""
    check_released(name)
    url, path = released_url(name), released_path(name)
    cached = os.path.isfile(path)
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=progress, weights_only=True)
    except (OSError, http.client.HTTPException) as e:  # offline, HTTP error, timeout, cache folder not writable
        if cached:
            raise CheckpointError(f"cannot read {path}: {e}") from None
        raise CheckpointError(f"could not download {name} from {url} ({_first_line(e)}); offline, copy the file "
                              f"to {path}") from None
    except Exception as e:  # the file is there but torch.load cannot read it
        if not cached and os.path.isfile(path):
            os.remove(path)
            raise CheckpointError(f"the download of {name} from {url} is not a readable checkpoint "
                                  f"({_first_line(e)}); nothing was kept") from None
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({_first_line(e)}): delete it to "
                              "download it again") from None


def _first_line(e):
    text = str(e).strip()
    return (text.splitlines()[0][:160] if text else "") or type(e).__name__


def kept(path):
    """What a run stopped by a failed write can resume from, in words (read without loading the weights)."""
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        done = [h["epoch"] for h in ckpt["history"]]
        if ckpt["epoch_sums"] is None and done:
            return f"the checkpoint of epoch {done[-1]} is kept"
        return f"the checkpoint of epoch {ckpt['epoch']}, iteration {ckpt['iteration']} is kept"
    except FileNotFoundError:
        return "no checkpoint was saved yet"
    except Exception:  # not ours, or unreadable: it is still untouched
        return f"{path} is kept as it was"
