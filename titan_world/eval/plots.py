"""Tiny PIL plotting (line plots over time, bar charts, filmstrips): no matplotlib dependency."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _nice_range(lo: float, hi: float) -> tuple[float, float]:
    if not math.isfinite(lo) or not math.isfinite(hi):
        return 0.0, 1.0
    if hi - lo < 1e-9:
        pad = max(abs(hi) * 0.05, 1e-3)
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.08
    return lo - pad, hi + pad


def line_plot(
    series: dict[str, tuple[Sequence[float], Sequence[float | None]]],
    path: str | Path,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    size: tuple[int, int] = (640, 360),
) -> Path:
    """Plot name -> (xs, ys) lines (None values leave gaps) with axes, ticks and a legend."""
    w, h = size
    ml, mr, mt, mb = 64, 16, 28, 44
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    f = _font()
    pts = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    if pts:
        xlo, xhi = min(p[0] for p in pts), max(p[0] for p in pts)
        ylo, yhi = _nice_range(min(p[1] for p in pts), max(p[1] for p in pts))
    else:
        xlo, xhi, ylo, yhi = 0.0, 1.0, 0.0, 1.0
    if xhi - xlo < 1e-12:
        xlo, xhi = xlo - 0.5, xhi + 0.5

    def px(x: float, y: float) -> tuple[float, float]:
        return (ml + (x - xlo) / (xhi - xlo) * (w - ml - mr), h - mb - (y - ylo) / (yhi - ylo) * (h - mt - mb))

    d.rectangle([ml, mt, w - mr, h - mb], outline="black")
    decimals = max(0, min(8, 2 - math.floor(math.log10(max(yhi - ylo, 1e-12)))))
    for i in range(5):
        yv = ylo + (yhi - ylo) * i / 4
        _, yy = px(xlo, yv)
        d.line([ml - 4, yy, ml, yy], fill="black")
        d.line([ml, yy, w - mr, yy], fill=(230, 230, 230))
        d.text((4, yy - 5), f"{yv:.{decimals}f}", fill="black", font=f)
        xv = xlo + (xhi - xlo) * i / 4
        xx, _ = px(xv, ylo)
        d.line([xx, h - mb, xx, h - mb + 4], fill="black")
        d.text((xx - 12, h - mb + 6), f"{xv:.3g}", fill="black", font=f)
    d.text((ml, 8), title, fill="black", font=f)
    d.text(((w - len(xlabel) * 6) / 2, h - 16), xlabel, fill="black", font=f)
    d.text((4, mt - 14), ylabel, fill="black", font=f)
    for i, (name, (xs, ys)) in enumerate(series.items()):
        col = PALETTE[i % len(PALETTE)]
        seg: list[tuple[float, float]] = []
        for x, y in list(zip(xs, ys)) + [(None, None)]:
            if y is None or not math.isfinite(y):
                if len(seg) > 1:
                    d.line(seg, fill=col, width=2)
                for p in seg:
                    d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=col)
                seg = []
            else:
                seg.append(px(x, y))
        ly = mt + 6 + 12 * i
        d.line([w - mr - 150, ly + 5, w - mr - 134, ly + 5], fill=col, width=2)
        d.text((w - mr - 130, ly), name[:22], fill="black", font=f)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def bar_chart(
    groups: list[str],
    series: dict[str, list[float | None]],
    path: str | Path,
    title: str = "",
    size: tuple[int, int] = (720, 360),
) -> Path:
    """Grouped bars: one group per label (e.g. dimension), one bar per series (e.g. run)."""
    w, h = size
    ml, mr, mt, mb = 40, 170, 28, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    f = _font()
    vals = [v for vs in series.values() for v in vs if v is not None and math.isfinite(v)]
    top = max([1.0] + vals)
    d.rectangle([ml, mt, w - mr, h - mb], outline="black")
    d.text((ml, 8), title, fill="black", font=f)
    for i in range(5):
        yv = top * i / 4
        yy = h - mb - yv / top * (h - mt - mb)
        d.line([ml, yy, w - mr, yy], fill=(230, 230, 230))
        d.text((4, yy - 5), f"{yv:.2f}", fill="black", font=f)
    gw = (w - ml - mr) / max(len(groups), 1)
    bw = gw * 0.8 / max(len(series), 1)
    for gi, g in enumerate(groups):
        d.text((ml + gi * gw + gw / 2 - 3 * len(g[:14]), h - mb + 6), g[:14], fill="black", font=f)
        for si, (_, vs) in enumerate(series.items()):
            v = vs[gi] if gi < len(vs) else None
            if v is None or not math.isfinite(v):
                continue
            x0 = ml + gi * gw + gw * 0.1 + si * bw
            d.rectangle([x0, h - mb - v / top * (h - mt - mb), x0 + bw - 1, h - mb], fill=PALETTE[si % len(PALETTE)])
    for si, name in enumerate(series):
        ly = mt + 12 * si
        d.rectangle([w - mr + 8, ly + 2, w - mr + 18, ly + 10], fill=PALETTE[si % len(PALETTE)])
        d.text((w - mr + 22, ly), name[:24], fill="black", font=f)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def filmstrip(
    rows: dict[str, np.ndarray], path: str | Path, num: int = 8, height: int = 96, fps: float | None = None
) -> Path:
    """Sample `num` evenly spaced frames per video (uint8 [T, H, W, 3]) into one labelled strip
    per row (all rows use the same frame indices of the shortest video)."""
    t = min(len(v) for v in rows.values())
    idx = np.linspace(0, t - 1, min(num, t)).round().astype(int)
    tiles = []
    for name, v in rows.items():
        scale = height / v.shape[1]
        tw = max(1, round(v.shape[2] * scale))
        strip = Image.new("RGB", (140 + len(idx) * (tw + 4), height + 16), "white")
        d = ImageDraw.Draw(strip)
        d.text((4, height // 2), name[:22], fill="black", font=_font())
        for j, i in enumerate(idx):
            fr = Image.fromarray(np.ascontiguousarray(v[i])).resize((tw, height), Image.BILINEAR)
            strip.paste(fr, (140 + j * (tw + 4), 0))
            label = f"{i / fps:.1f}s" if fps else f"#{i}"
            d.text((140 + j * (tw + 4), height + 2), label, fill="black", font=_font())
        tiles.append(strip)
    out = Image.new("RGB", (max(s.width for s in tiles), sum(s.height for s in tiles)), "white")
    y = 0
    for s in tiles:
        out.paste(s, (0, y))
        y += s.height
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return path
