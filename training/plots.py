"""The loss curve as a PNG, drawn with PIL (already a dependency: no plotting library just for one line)."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

from mmditx.checkpoint import written_whole

SIZE, MARGIN = (640, 360), 48


def loss_curve_png(history: list[dict], path: str | Path, smooth: int = 10) -> Path:
    """Loss per step (thin, grey) and its running mean over `smooth` steps (thick), log-scaled y axis."""
    im = Image.new("RGB", SIZE, "white")
    d = ImageDraw.Draw(im)
    w, h = SIZE
    d.rectangle((MARGIN, MARGIN // 2, w - MARGIN // 2, h - MARGIN), outline="black")
    pts = [(r["step"], r["loss"]) for r in history if r.get("loss", 0) > 0 and math.isfinite(r["loss"])]
    if pts:
        steps = [s for s, _ in pts]
        logs = [math.log10(v) for _, v in pts]
        lo, hi = min(logs), max(logs)
        hi = hi if hi > lo else lo + 1
        s0, s1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1

        def xy(step, lg):
            return (MARGIN + (step - s0) / (s1 - s0) * (w - 1.5 * MARGIN),
                    h - MARGIN - (lg - lo) / (hi - lo) * (h - 1.5 * MARGIN))

        d.line([xy(s, lg) for s, lg in zip(steps, logs)], fill=(170, 170, 170), width=1)
        means = [sum(logs[max(0, i - smooth + 1):i + 1]) / len(logs[max(0, i - smooth + 1):i + 1])
                 for i in range(len(logs))]
        d.line([xy(s, m) for s, m in zip(steps, means)], fill=(200, 40, 40), width=3)
        d.text((4, MARGIN // 2), f"{10 ** hi:.3g}", fill="black")
        d.text((4, h - MARGIN - 10), f"{10 ** lo:.3g}", fill="black")
        d.text((MARGIN, h - MARGIN + 6), f"step {s0}", fill="black")
        d.text((w - 2 * MARGIN, h - MARGIN + 6), f"step {max(steps)}", fill="black")
    d.text((w // 2 - 60, h - MARGIN // 2 - 4), "training loss (log scale)", fill="black")
    path = Path(path)
    with written_whole(path) as tmp:
        im.save(tmp)
    return path
