"""Small line / histogram / scatter charts drawn with Pillow (the run pictures' plots).

Why not matplotlib: a run's pictures must cost < 5% of a quick trial (docs/performance.md),
and importing matplotlib plus drawing four figures takes longer than that on its own
(about 0.6 s on an idle core, against a quick trial of a few seconds); these charts draw in
milliseconds. What they can do is what the pictures need: panels on one canvas, linear
or log-10 axes with "nice" ticks, lines with markers, dashed reference lines, filled
histogram steps with transparency, scattered dots, a legend, titles.

Every drawn series is kept in ``Panel.series`` (kind, label, x, y), so a test can read
back exactly the values a chart shows.
"""

from __future__ import annotations

import functools
import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
"""matplotlib's tab10 (C0..C9)."""
GREY = (128, 128, 128)
PNG_LEVEL = 1
"""zlib level of the PNG files: fast; the files are a little larger (tens of kB)."""


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_bytes(pixels: Any, level: int = PNG_LEVEL) -> bytes:
    """An 8-bit RGB PNG of ``pixels`` (a Pillow image or an ``H x W x 3`` uint8 array).

    Every row gets the PNG "Up" filter (its difference to the row above, one numpy
    subtraction), then one ``zlib.compress``. Pillow's own PNG encoder picks a filter per
    row by trying all five on its 4-byte pixels: about 3x slower for these mostly flat
    charts, for files of the same size (the run's pictures must cost < 5% of a quick trial,
    docs/performance.md)."""
    if hasattr(pixels, "convert") and pixels.mode != "RGB":
        pixels = pixels.convert("RGB")
    a = np.asarray(pixels, dtype=np.uint8)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"png_bytes needs H x W x 3 pixels, not {a.shape}")
    h, w, _ = a.shape
    rows = a.reshape(h, w * 3)
    raw = np.empty((h, w * 3 + 1), dtype=np.uint8)
    raw[:, 0] = 2  # Up
    raw[0, 0] = 0  # the first row has no row above: None
    raw[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])  # modulo 256, as PNG defines it
    head = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, truecolour, deflate, no interlace
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", head) + _png_chunk(b"IDAT", zlib.compress(raw, level))
            + _png_chunk(b"IEND", b""))


def save_png(pixels: Any, path: Any, level: int = PNG_LEVEL) -> Any:
    """Write :func:`png_bytes` of ``pixels`` to ``path``; the path."""
    with open(path, "wb") as f:
        f.write(png_bytes(pixels, level))
    return path


@functools.lru_cache(maxsize=None)
def font(size: int = 11):
    """Pillow's own font (no file needed), cached: loading it decodes it each time."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 or no FreeType: the bitmap font
        return ImageFont.load_default()


def class_colour(i: int, n: int) -> tuple[int, int, int]:
    """Colour of class ``i`` of ``n``: tab10 up to 10 classes, else evenly spread hues."""
    if n <= len(PALETTE):
        return PALETTE[i % len(PALETTE)]
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.85)
    return int(r * 255), int(g * 255), int(b * 255)


def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> np.ndarray:
    """About ``n`` round tick values (steps 1, 2, 2.5, 5 x 10^k) covering ``[lo, hi]``."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return np.array([])
    if hi <= lo:
        return np.array([lo])
    raw = (hi - lo) / max(n, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw * 0.999)
    if integer:
        step = max(1.0, round(step))
    start = math.ceil(lo / step - 1e-9) * step
    return np.arange(start, hi + step * 1e-6, step)


def fmt(v: float) -> str:
    if v == 0:
        return "0"
    return f"{v:.3g}"


@dataclass
class Panel:
    """One chart in the box ``(x0, y0, x1, y1)`` of a :class:`Canvas`; call :meth:`draw` last."""

    box: tuple[int, int, int, int]
    title: str = ""
    xlabel: str = ""
    ylog: bool = False
    xinteger: bool = False
    series: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def line(self, x: Sequence[float], y: Sequence[float], colour=PALETTE[0], label: str = "", marker: bool = True) -> None:
        self.series.append(dict(kind="line", x=np.asarray(x, float), y=np.asarray(y, float), colour=colour,
                                label=label, marker=marker))

    def hline(self, y: float, colour=GREY, label: str = "") -> None:
        self.series.append(dict(kind="hline", x=np.array([]), y=np.array([float(y)]), colour=colour, label=label))

    def vline(self, x: float, colour=GREY, label: str = "") -> None:
        self.series.append(dict(kind="vline", x=np.array([float(x)]), y=np.array([]), colour=colour, label=label))

    def stairs(self, counts: Sequence[float], edges: Sequence[float], colour=PALETTE[0], label: str = "") -> None:
        self.series.append(dict(kind="stairs", x=np.asarray(edges, float), y=np.asarray(counts, float),
                                colour=colour, label=label))

    def dots(self, x: Sequence[float], y: Sequence[float], colours: Sequence[tuple[int, int, int]], label: str = "") -> None:
        self.series.append(dict(kind="dots", x=np.asarray(x, float), y=np.asarray(y, float), colour=list(colours),
                                label=label))

    def key(self, label: str, colour: tuple[int, int, int]) -> None:
        """A legend entry without data (e.g. a class colour of a scatter)."""
        self.series.append(dict(kind="key", x=np.array([]), y=np.array([]), colour=colour, label=label))

    def note(self, text: str) -> None:
        """A grey line of text in the middle of the panel (e.g. "not computed")."""
        self.notes.append(text)

    # ---- drawing ------------------------------------------------------------------
    def _ranges(self) -> tuple[float, float, float, float]:
        xs = [s["x"] for s in self.series if s["kind"] != "hline" and len(s["x"])]
        ys = [s["y"] for s in self.series if s["kind"] != "vline" and len(s["y"])]
        if any(s["kind"] == "stairs" for s in self.series):
            ys.append(np.array([0.0]))
        x = np.concatenate(xs) if xs else np.array([0.0, 1.0])
        y = np.concatenate(ys) if ys else np.array([0.0, 1.0])
        x, y = x[np.isfinite(x)], y[np.isfinite(y)]
        if self.ylog:
            y = np.log10(y[y > 0]) if (y > 0).any() else np.array([0.0, 1.0])
        x0, x1 = (float(x.min()), float(x.max())) if len(x) else (0.0, 1.0)
        y0, y1 = (float(y.min()), float(y.max())) if len(y) else (0.0, 1.0)
        if x1 <= x0:
            x0, x1 = x0 - 0.5, x1 + 0.5
        if y1 <= y0:
            y0, y1 = y0 - (abs(y0) * 0.05 or 0.5), y1 + (abs(y1) * 0.05 or 0.5)
        py = (y1 - y0) * 0.06
        px = 0.0 if any(s["kind"] == "stairs" for s in self.series) else (x1 - x0) * 0.04
        return x0 - px, x1 + px, y0 - (0 if self.ylog is False and y0 == 0 else py), y1 + py

    def draw(self, canvas: "Canvas") -> None:
        from PIL import ImageDraw

        d = ImageDraw.Draw(canvas.image, "RGBA")
        f, small = font(11), font(9)
        bx0, by0, bx1, by1 = self.box
        left, right, top, bottom = bx0 + 46, bx1 - 8, by0 + 20, by1 - (30 if self.xlabel else 18)
        x0, x1, y0, y1 = self._ranges()

        def px(v):
            return left + (np.asarray(v, float) - x0) / (x1 - x0) * (right - left)

        def py(v):
            v = np.asarray(v, float)
            if self.ylog:
                v = np.log10(np.where(v > 0, v, np.nan))
            return bottom - (v - y0) / (y1 - y0) * (bottom - top)

        if self.title:
            d.text(((left + right) // 2, by0 + 3), self.title, fill=(0, 0, 0), font=f, anchor="ma")
        if self.xlabel:
            d.text(((left + right) // 2, by1 - 3), self.xlabel, fill=(0, 0, 0), font=small, anchor="md")
        for t in nice_ticks(x0, x1, 5, self.xinteger):
            X = float(px(t))
            d.line([(X, bottom), (X, bottom + 3)], fill=(0, 0, 0))
            d.text((X, bottom + 4), fmt(t), fill=(0, 0, 0), font=small, anchor="ma")
        if self.ylog:
            decades = np.arange(math.ceil(y0), math.floor(y1) + 1)
            if len(decades) < 2:  # less than a decade: ticks at 1, 2, 5 x 10^k
                decades = np.array([math.log10(m * 10.0 ** e) for e in range(math.floor(y0), math.ceil(y1) + 1)
                                    for m in (1, 2, 5) if y0 <= math.log10(m * 10.0 ** e) <= y1])
            yt = 10.0 ** decades
        else:
            yt = nice_ticks(y0, y1, 5)
        for t in yt:
            Y = float(py(t))
            d.line([(left - 3, Y), (left, Y)], fill=(0, 0, 0))
            d.line([(left, Y), (right, Y)], fill=(0, 0, 0, 25))
            d.text((left - 5, Y), fmt(t), fill=(0, 0, 0), font=small, anchor="rm")
        for s in self.series:
            c = tuple(s["colour"]) if s["kind"] != "dots" else None
            if s["kind"] == "line":
                ok = np.isfinite(s["y"]) & (s["y"] > 0 if self.ylog else True)
                pts = list(zip(px(s["x"][ok]).tolist(), py(s["y"][ok]).tolist()))
                if len(pts) > 1:
                    d.line(pts, fill=c, width=2)
                if s["marker"]:
                    for X, Y in pts:
                        d.ellipse([X - 2.5, Y - 2.5, X + 2.5, Y + 2.5], fill=c)
            elif s["kind"] == "hline":
                Y = float(py(s["y"][0]))
                _dashed(d, (left, Y), (right, Y), c)
            elif s["kind"] == "vline":
                X = float(px(s["x"][0]))
                _dashed(d, (X, top), (X, bottom), c)
            elif s["kind"] == "stairs":
                e, h = s["x"], s["y"]
                base = float(py(0.0)) if not self.ylog else bottom
                for a, b, v in zip(px(e[:-1]).tolist(), px(e[1:]).tolist(), py(h).tolist()):
                    if v < base:
                        d.rectangle([a, v, b, base], fill=c + (110,))
            elif s["kind"] == "dots":  # stamped with numpy: thousands of dots in milliseconds
                _stamp(canvas.image, px(s["x"]), py(s["y"]), np.asarray(s["colour"], dtype=np.uint8))
        d.rectangle([left, top, right, bottom], outline=(0, 0, 0))
        for i, text in enumerate(self.notes):
            d.text(((left + right) // 2, (top + bottom) // 2 + 14 * i), text, fill=GREY, font=f, anchor="mm")
        labelled = [s for s in self.series if s["label"] and s["kind"] != "dots"]
        if labelled:
            w = max(d.textlength(s["label"], font=small) for s in labelled) + 26
            lx, ly = right - w - 4, top + 4
            d.rectangle([lx, ly, lx + w, ly + 4 + 13 * len(labelled)], fill=(255, 255, 255, 220), outline=(180, 180, 180))
            for i, s in enumerate(labelled):
                yy = ly + 9 + 13 * i
                d.line([(lx + 4, yy), (lx + 18, yy)], fill=tuple(s["colour"]), width=3)
                d.text((lx + 22, yy), s["label"], fill=(0, 0, 0), font=small, anchor="lm")


DISC = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if dy * dy + dx * dx <= 5]
"""Pixel offsets of a dot (radius ~2.2 px)."""


def _stamp(image: Any, X: np.ndarray, Y: np.ndarray, colours: np.ndarray) -> None:
    from PIL import Image

    arr = np.array(image)
    ok = np.isfinite(X) & np.isfinite(Y)
    xi, yi, col = np.rint(X[ok]).astype(int), np.rint(Y[ok]).astype(int), colours[ok]
    h, w = arr.shape[:2]
    for dy, dx in DISC:
        yy, xx = yi + dy, xi + dx
        inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        arr[yy[inside], xx[inside]] = col[inside]
    image.paste(Image.fromarray(arr))


def _dashed(d: Any, a: tuple[float, float], b: tuple[float, float], colour: tuple[int, int, int], dash: float = 5) -> None:
    (xa, ya), (xb, yb) = a, b
    n = max(1, int(math.hypot(xb - xa, yb - ya) // dash))
    for i in range(0, n, 2):
        t0, t1 = i / n, min(i + 1, n) / n
        d.line([(xa + (xb - xa) * t0, ya + (yb - ya) * t0), (xa + (xb - xa) * t1, ya + (yb - ya) * t1)], fill=colour)


class Canvas:
    """A white image holding a grid of :class:`Panel` s."""

    def __init__(self, width: int, height: int, rows: int = 1, cols: int = 1, title: str = "", **panel_kw: Any):
        from PIL import Image

        self.image = Image.new("RGB", (width, height), (255, 255, 255))
        self.title = title
        head = 20 if title else 0
        pw, ph = width // cols, (height - head) // rows
        self.panels = [Panel((c * pw, head + r * ph, (c + 1) * pw, head + (r + 1) * ph), **panel_kw)
                       for r in range(rows) for c in range(cols)]

    def save(self, path: Any) -> Any:
        from PIL import ImageDraw

        if self.title:
            ImageDraw.Draw(self.image).text((self.image.width // 2, 3), self.title, fill=(0, 0, 0), font=font(12), anchor="ma")
        for p in self.panels:
            p.draw(self)
        return save_png(self.image, path)
