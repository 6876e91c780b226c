"""Training curves from train.py's log.txt: loss, teacher entropy, KL and online k-NN per epoch (cf. paper Fig. 7);
the k-NN panel has the teacher (solid) and, where logged, the student (thin, hollow dots: Fig. 6 left).

    python plot_log.py out/log.txt --out docs/curves.png
    python plot_log.py runs/no_centering/log.txt runs/no_sharpening/log.txt runs/both/log.txt --out docs/collapse.png

One panel per quantity, one coloured line per log (named after its folder). The entropy panel shows h(P_t) / log K,
so 0 is the one-hot collapse and 1 the uniform one. Drawn with PIL alone.
"""
import argparse
import json
import math
import os
import sys

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]
PANELS = [("loss", "loss"), ("teacher_entropy", "teacher entropy / log K"), ("kl", "KL(P_t || P_s)"),
          ("knn_top1", "online 20-NN top-1 (%): teacher solid, student thin")]
STUDENT = "_student"  # log.txt's knn_top1_student is drawn in knn_top1's panel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules



def read_log(path, out_dim=None):
    """Epoch records of a log.txt; the entropy is divided by log K (K from the run's checkpoint args if given)."""
    with open(path) as f:
        logs = [json.loads(line) for line in f if line.strip()]
    if out_dim:
        for log in logs:
            log["teacher_entropy"] = log["teacher_entropy"] / math.log(out_dim)
    return logs


def panel(draw, box, runs, key, title):
    """One line chart in box = (left, top, right, bottom): x = epoch, y = the value of `key`."""
    left, top, right, bottom = box
    series = [[(log["epoch"], log[key]) for log in logs if key in log] for _, logs in runs]
    students = [[(log["epoch"], log[key + STUDENT]) for log in logs if key + STUDENT in log] for _, logs in runs]
    points = [p for s in series + students for p in s]
    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((left + 4, top - 14), title, fill=(0, 0, 0))
    if not points:
        draw.text((left + 8, top + 8), "not logged", fill=(120, 120, 120))
        return
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    if key == "teacher_entropy" and y1 <= 1.0:
        y0, y1 = 0.0, 1.0  # the fraction of log K: show the whole range between the two collapses
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-3)
    to_px = lambda x, y: (left + 8 + (right - left - 16) * (x - x0) / (x1 - x0),
                          bottom - 8 - (bottom - top - 16) * (y - y0) / (y1 - y0))
    draw.text((left + 4, bottom + 2), f"epoch {x0}..{x1}", fill=(80, 80, 80))
    draw.text((right - 90, bottom + 2), f"{y0:.3g}..{y1:.3g}", fill=(80, 80, 80))
    for i, (s, student) in enumerate(zip(series, students)):
        colour = COLOURS[i % len(COLOURS)]
        for points, width, fill in ((s, 2, colour), (student, 1, None)):
            pixels = [to_px(x, y) for x, y in points]
            if len(pixels) > 1:
                draw.line(pixels, fill=colour, width=width)
            for px, py in pixels:
                draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=fill, outline=colour)


def plot(runs, out, width=900, height=560):
    """runs: [(name, epoch records)] -> a 2x2 grid of panels saved as PNG at `out`."""
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    w, h = (width - 60) // 2, (height - 110) // 2
    for i, (key, title) in enumerate(PANELS):
        left, top = 20 + (i % 2) * (w + 20), 30 + (i // 2) * (h + 40)
        panel(draw, (left, top, left + w, top + h), runs, key, title)
    for i, (name, _) in enumerate(runs):  # legend
        draw.rectangle([20 + 200 * i, height - 22, 32 + 200 * i, height - 10], fill=COLOURS[i % len(COLOURS)])
        draw.text((38 + 200 * i, height - 23), name, fill=(0, 0, 0))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    img.save(out)
    return img


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", help="log.txt files written by train.py")
    p.add_argument("--out", default="curves.png", help="PNG to write")
    p.add_argument("--out_dim", type=int, default=None, help="K, to show the entropy as a fraction of log K "
                   "(default: read from the checkpoint.pth beside each log, else raw entropy)")
    args = p.parse_args(argv)
    runs = []
    for path in args.logs:
        if not os.path.isfile(path):
            print(f"error: log not found: {path}", file=sys.stderr)
            return 2
        out_dim = args.out_dim or saved_out_dim(os.path.join(os.path.dirname(path), "checkpoint.pth"))
        runs.append((os.path.basename(os.path.dirname(os.path.abspath(path))), read_log(path, out_dim)))
    plot(runs, args.out)
    print(f"wrote {args.out}")
    return 0


def saved_out_dim(ckpt_path):
    if not os.path.isfile(ckpt_path):
        return None
    import checkpoint  # torch is only needed for this look-up
    try:
        return int(checkpoint.load(ckpt_path)["args"]["out_dim"])
    except Exception:  # an unreadable checkpoint just means raw entropy
        return None


if __name__ == "__main__":
    sys.exit(main())
