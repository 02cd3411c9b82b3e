#!/usr/bin/env python3
"""Draws docs/performance.svg: Salus against llama.cpp on the main figures.

Standard library only. The figures are those of docs/performance.md
(2026-11-29, development machine, default model); a range is drawn at its
midpoint, a list of runs at its median. Edit FIGURES and rerun:

    python3 scripts/perf-chart.py [OUT.svg]
"""

import os
import statistics
import sys
from xml.sax.saxutils import escape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "docs", "performance.svg")

mid = lambda lo, hi: (lo + hi) / 2  # noqa: E731

# (panel title, unit, higher is better, [(group label, salus, llama.cpp)])
FIGURES = [
    ("Single stream (llama-bench / salus generate --bench)", "tok/s", True, [
        ("prompt processing", mid(3349, 3371), 464.8),
        ("decode", mid(377, 418), 185.5),
    ]),
    ("HTTP aggregate output, same load generator", "tok/s", True, [
        ("1 stream", statistics.median([390.3, 382.2, 371.9]), 164.8),
        ("8 streams", statistics.median([1364.2, 1275.0, 1296.1]), 224.1),
        ("16 streams", 1453.6, 249.5),
    ]),
    ("HTTP time to first token, p50", "ms", False, [
        ("1 stream", mid(11.0, 11.2), 52.2),
        ("8 streams", mid(22.9, 25.8), 362.0),
        ("16 streams", 36.6, 778.0),
    ]),
]

SALUS, PEER = "#1f6f8b", "#c8553d"
W, TOP, LEFT, RIGHT, LABEL = 820, 84, 150, 130, 90
BAR_H, GAP = 16, 3


def fmt(v):
    return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"


def text(x, y, s, size=12, anchor="start", weight="normal", fill="#222"):
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
            f'font-weight="{weight}" fill="{fill}">{escape(s)}</text>')


def main():
    height = TOP + sum(40 + len(groups) * (2 * BAR_H + GAP + 14) for _, _, _, groups in FIGURES) + 30
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" '
           f'viewBox="0 0 {W} {height}" font-family="sans-serif">',
           f'<rect width="{W}" height="{height}" fill="white"/>',
           text(20, 26, "Salus vs llama.cpp — SmolLM2-135M-Instruct Q4_1, 2 cores (AMD EPYC Zen 5, AVX-512 VNNI)",
                size=14, weight="bold"),
           text(20, 44, "2026-11-29, same machine, same minutes; ranges at their midpoint, runs at their median",
                size=11, fill="#555")]
    # Legend.
    for i, (name, colour) in enumerate([("Salus", SALUS), ("llama.cpp", PEER)]):
        x = 20 + i * 95
        out.append(f'<rect x="{x}" y="{TOP - 26}" width="12" height="12" fill="{colour}"/>')
        out.append(text(x + 17, TOP - 16, name, size=12))
    y = TOP
    plot_w = W - LEFT - RIGHT - LABEL
    for title, unit, higher_better, groups in FIGURES:
        hint = "higher is better" if higher_better else "lower is better"
        out.append(text(20, y + 14, f"{title} ({unit}, {hint})", size=13, weight="bold"))
        y += 26
        top = max(max(s, p) for _, s, p in groups)
        for label, s, p in groups:
            out.append(text(LEFT - 10, y + BAR_H + 4, label, size=12, anchor="end"))
            ratio = s / p if higher_better else p / s
            for j, (v, colour) in enumerate([(s, SALUS), (p, PEER)]):
                by = y + j * (BAR_H + GAP)
                bw = max(1.0, plot_w * v / top)
                out.append(f'<rect x="{LEFT}" y="{by}" width="{bw:.1f}" height="{BAR_H}" fill="{colour}"/>')
                out.append(text(LEFT + bw + 6, by + BAR_H - 4, f"{fmt(v)} {unit}", size=11))
            better = "faster" if higher_better else "sooner"
            out.append(text(W - 20, y + BAR_H + 4, f"{ratio:.1f}× {better}", size=12, anchor="end",
                            weight="bold", fill=SALUS))
            y += 2 * BAR_H + GAP + 14
        y += 14
    out.append(text(20, height - 12, "Figures and commands: docs/performance.md", size=11, fill="#555"))
    out.append("</svg>")
    with open(OUT, "w", encoding="utf-8") as f:
        f.write("\n".join(out) + "\n")
    print(OUT)


if __name__ == "__main__":
    main()
