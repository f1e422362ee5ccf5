"""Loss and held-out accuracy vs iteration of a run, as a PNG (Pillow only; no matplotlib).

    make train ARGS="--metrics-file runs/digits.jsonl"
    python bench/accuracy_curve.py runs/digits.jsonl docs/digits_curve.png

Left panel: training loss (grey) and held-out loss (blue) on a log scale; right panel: held-out
answer accuracy (%), with the 90 % target as a red line. Prints the final numbers as JSON.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw

WIDTH, HEIGHT, PANEL, MARGIN = 960, 400, 440, 50
GREY, BLUE, RED, BLACK = (150, 150, 150), (30, 90, 200), (200, 40, 40), (0, 0, 0)


def read_metrics(path: Path) -> tuple[list[tuple[int, float]], list[dict]]:
    """(iteration, training loss) pairs and the evaluation records of a metrics JSONL file."""
    train, evals = [], []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "eval_loss" in record:
            evals.append(record)
        else:
            train.append((record["iteration"], record["loss"]))
    return train, evals


def panel(draw: ImageDraw.ImageDraw, left: int, title: str, x_max: int, y_range: tuple[float, float],
          series: list[tuple[list[tuple[float, float]], tuple[int, int, int]]], y_label,
          y_ticks: list[float]) -> None:
    """Axes, ticks and polylines of one panel (y already transformed by the caller)."""
    top, bottom, right = MARGIN, HEIGHT - MARGIN, left + PANEL - MARGIN
    y_lo, y_hi = y_range

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (right - left) * x / x_max,
                bottom - (bottom - top) * (y - y_lo) / max(y_hi - y_lo, 1e-9))

    draw.rectangle([left, top, right, bottom], outline=BLACK)
    draw.text((left, top - 20), title, fill=BLACK)
    for y in y_ticks:
        draw.text((left - 45, at(0, y)[1] - 6), y_label(y), fill=BLACK)
    for i in range(5):
        x = x_max * i / 4
        draw.text((at(x, y_lo)[0] - 10, bottom + 6), f"{x:.0f}", fill=BLACK)
    draw.text(((left + right) / 2 - 25, bottom + 24), "iteration", fill=BLACK)
    for points, color in series:
        if len(points) > 1:
            draw.line([at(x, y) for x, y in points], fill=color, width=2)
        for x, y in points if len(points) < 40 else []:
            px, py = at(x, y)
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)


def draw_curves(train: list[tuple[int, float]], evals: list[dict], out: Path) -> None:
    """Write the two-panel PNG."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    x_max = max(it for it, _ in train)
    log_train = [(it, math.log10(loss)) for it, loss in train]
    log_eval = [(r["iteration"], math.log10(r["eval_loss"])) for r in evals]
    lows = [y for _, y in log_train + log_eval]
    decades = range(math.floor(min(lows)), math.ceil(max(lows)) + 1)
    panel(draw, 60, "loss (grey: training, blue: held-out), log scale", x_max,
          (decades[0], decades[-1]), [(log_train, GREY), (log_eval, BLUE)],
          lambda y: f"{10 ** y:g}", list(decades))
    accuracy = [(r["iteration"], 100.0 * r["eval_accuracy"]) for r in evals]
    panel(draw, 60 + PANEL + 20, "held-out digit accuracy (%), target 90 % (red)", x_max,
          (0.0, 100.0), [([(0, 90.0), (x_max, 90.0)], RED), (accuracy, BLUE)],
          lambda y: f"{y:.0f}", [0, 25, 50, 75, 90, 100])
    image.save(out)


def main(argv: list[str]) -> int:
    metrics, out = Path(argv[0]), Path(argv[1])
    train, evals = read_metrics(metrics)
    draw_curves(train, evals, out)
    print(json.dumps({"png": str(out), "iterations": train[-1][0],
                      "final_eval": evals[-1] if evals else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
