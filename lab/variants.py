"""Embedded datasets that only the lab uses, put into data.VARIANTS when this module is imported (the core never
imports the lab, so `python train.py --data silhouettes` does not know them; run the script through this file).

`silhouettes`: the ten shapes of `scatter` and `shapes` (data.SHAPES), one per image, large (50-70% of the side
across), white on black, with no clutter or noise: an easy control on which DINO visibly learns in minutes and on
which raw pixels already find the class (the preset was tuned on it until 2026-11-24: lab/notes/recipe.md).

    python lab/variants.py train.py --data silhouettes --output_dir runs/silhouettes   # any top-level script
    python lab/variants.py data.py --make_folder /tmp/silhouettes --variant silhouettes
"""
import os
import runpy
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the repository's modules
import data  # noqa: E402


def render_silhouette(rng, shapes, label, size=64, plain=False):
    """One large shape (radius 25-35% of the side), white on black: data.render_object without its background."""
    return data.render_object(rng, shapes, label, size, plain=True, radius=(0.25, 0.35))


data.VARIANTS["silhouettes"] = (data.SHAPES, render_silhouette)

if __name__ == "__main__":
    if len(sys.argv) < 2 or not sys.argv[1].endswith(".py"):
        sys.exit("usage: python lab/variants.py SCRIPT.py [its flags]   (a top-level script, e.g. train.py)")
    sys.argv = sys.argv[1:]  # the script sees its own name and flags
    if sys.argv[0] == "data.py":  # run as a script it would be a second data module, without these variants
        data.main(sys.argv[1:])
    else:
        runpy.run_path(os.path.join(REPO, sys.argv[0]), run_name="__main__")
