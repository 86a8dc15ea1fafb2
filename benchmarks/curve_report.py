"""The compression curve's rows on disk, and its table and plot (``python benchmarks/run.py curve``; see curve.py)."""

from __future__ import annotations

import json
from pathlib import Path

from common import RESULTS, header, write


# key: (label, cut, pwp, sgd); cut "hp" is HierarchicalPrune's plan from the contribution analysis; pwp None = not distilled
METHODS: dict[str, tuple[str, str, bool | None, str | None]] = {
    "hp": ("HierarchicalPrune (HPP + PWP + SGDistill)", "hp", True, "continuous"),
    "hp-no-pwp": ("HP without PWP", "hp", False, "continuous"),
    "hp-no-sgd": ("HP without SGDistill", "hp", True, "off"),
    "hp-binary-sgd": ("HP with the reference's binary SGDistill", "hp", True, "binary"),
    "last-n-kd": ("last-N removal + plain KD", "last", False, "off"),
    "even-kd": ("evenly spaced removal + plain KD", "even", False, "off"),
    "magnitude-kd": ("magnitude block ranking + plain KD", "magnitude", False, "off"),
    "no-distill": ("HP's cut, no distillation", "hp", None, None),
}


DISTILLED = [m for m, v in METHODS.items() if v[2] is not None]


def rows_dir(family: str) -> Path:
    return RESULTS / f"curve-{family}" / "rows"


def load_rows(family: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(rows_dir(family).glob("*.json"))]


def best_lrs(rows: list[dict], sweep_fraction: float, steps: int) -> dict[str, float]:
    """Each distilled method's learning rate with the highest overall score at the sweep fraction (ties: the lower);
    a method refused at every rate there (a refusal does not depend on the rate) keeps the lowest rate it was tried at."""
    best: dict[str, tuple[float, float]] = {}
    for r in rows:
        if r["fraction"] != sweep_fraction or r["lr"] is None or r["steps"] != steps:
            continue
        score = r["eval"]["overall"] if r["status"] == "ok" else -1.0
        if r["method"] not in best or (score, -r["lr"]) > (best[r["method"]][0], -best[r["method"]][1]):
            best[r["method"]] = (score, r["lr"])
    return {m: lr for m, (_, lr) in best.items()}


# --------------------------------------------------------------------------------------------- table and plot
def report(family: str, fractions: list[float], sweep_fraction: float, steps: int, lrs: list[float], command: str) -> None:
    from hpedge.compress.pwp import resolve_pwp
    from hpedge.compress.settings import DistillSettings
    from hpedge.zoo.evaluate import paired_difference, paired_ratio
    from hpedge.models import adapters
    from hpedge.models.loading import load_pipeline

    teacher_file = rows_dir(family).parent / "teacher.json"
    if not teacher_file.exists():
        raise SystemExit(f"{teacher_file} is missing: run the curve first")
    teacher = json.loads(teacher_file.read_text())["eval"]
    num_blocks = len(adapters.blocks(load_pipeline(f"zoo:digits-{family}").transformer))
    rows = [r for r in load_rows(family) if r.get("steps") == steps or r["lr"] is None]
    best = best_lrs(rows, sweep_fraction, steps)
    chosen = {f: [r for r in rows if r["fraction"] == f and (r["lr"] is None or best.get(r["method"]) == r["lr"])]
              for f in fractions}
    for rs in chosen.values():
        for r in rs:
            if r["status"] == "ok":
                r["paired"] = paired_ratio(teacher, r["eval"])
    n = teacher["samples"]
    text = header(f"Compression curve on zoo:digits-{family}: methods x share of blocks removed ({n} prompts)")
    dates = sorted(r["date"] for r in rows)
    jobs = "/".join(str(j) for j in sorted({r.get("jobs", 1) for r in rows})) or "1"
    text += (f"Rows were run one per process ({jobs} at a time, the cores split between them) "
             f"and kept in [curve-{family}/rows/](curve-{family}/rows/) with their own command, machine and date "
             f"({dates[0] if dates else '-'} to {dates[-1] if dates else '-'}); this file is written from them. "
             f"Every distilled row: {steps} steps, batch 16, seed 0, at its method's best learning rate of "
             f"{', '.join(f'{x:g}' for x in lrs)} at {sweep_fraction:.0%} removed (sweep below). HP's cut is `hpedge compress`'s "
             f"plan from one contribution analysis (protect-early {rows[0]['protect_early'] if rows else '-'}); baselines "
             "distil with plain output + feature KD (no PWP, no SGDistill). Teacher: overall "
             f"{teacher['overall']:.3f}, Frechet {teacher['frechet_distance']:.1f}.\n\n")
    text += f"![score vs kept parameters](curve-{family}.png)\n\n"
    for f in fractions:
        rs = sorted(chosen[f], key=lambda r: -(r["eval"]["overall"] if r["status"] == "ok" else -1))
        text += (f"## {f:.0%} of the blocks removed\n\n| method | removed blocks | kept params | lr | overall | vs teacher | "
                 "paired 95 % interval | Frechet | PWP froze | distill time |\n|---|---|---|---|---|---|---|---|---|---|\n")
        for r in rs:
            label = METHODS[r["method"]][0]
            if r["status"] != "ok":
                text += f"| {label} | {r['cut']} | - | {format(r['lr'], 'g')} | refused | - | - | - | - | - |\n"
                continue
            ci = r["paired"]["ci95"]
            text += (f"| {label} | {r['cut']} | {r['kept_ratio']:.1%} | {'-' if r['lr'] is None else format(r['lr'], 'g')} | "
                     f"{r['eval']['overall']:.3f} | {r['paired']['ratio']:.1%} | {ci[0]:.1%}-{ci[1]:.1%} | "
                     f"{r['eval']['frechet_distance']:.1f} | {r['frozen_blocks_pwp'] or '-'} | {r['distill_seconds']:.0f} s |\n")
        missing = [METHODS[m][0] for m in METHODS if not any(r["method"] == m for r in rs)]
        if missing:
            text += f"\nNot run yet at {f:.0%}: {', '.join(missing)}.\n"
        text += "\n" + leader_line([r for r in rs if r["status"] == "ok"], teacher, paired_difference) + "\n\n"
        hp_cut = next((r["cut"] for r in rs if METHODS[r["method"]][1] == "hp"), None)
        if hp_cut is not None:
            on, why = resolve_pwp(hp_cut, num_blocks, DistillSettings())
            text += (f"`hpedge compress`'s default at this cut: {why}; that is the row "
                     f"\"{METHODS['hp' if on else 'hp-no-pwp'][0]}\".\n\n")
        for r in rs:
            if r["status"] != "ok":
                text += f"- {METHODS[r['method']][0]}: refused by `hpedge compress`: {r['why']}\n"
    text += sweep_table(rows, sweep_fraction, steps, lrs, best)
    write(f"curve-{family}.md", text)
    plot({f: chosen[f] for f in fractions}, RESULTS / f"curve-{family}.png", f"zoo:digits-{family}: share of the teacher's score")


def leader_line(rows: list[dict], teacher: dict, paired_difference) -> str:
    """Which method leads, by how much over the runner-up, and whether the paired interval of the lead excludes 0."""
    if len(rows) < 2:
        return "Leader: too few rows to compare."
    a, b = sorted(rows, key=lambda r: -r["eval"]["overall"])[:2]
    d = paired_difference(teacher, a["eval"], b["eval"])
    verdict = "outside the paired interval" if d["outside"] else "within the paired interval (not separated)"
    hp = next((r for r in rows if r["method"] == "hp"), None)
    tail = ""
    if hp is not None and hp is not a:
        dh = paired_difference(teacher, a["eval"], hp["eval"])
        tail = (f" HP trails it by {dh['difference']:.1%} of the teacher ({dh['ci95'][0]:.1%} to {dh['ci95'][1]:.1%}, "
                f"{'outside' if dh['outside'] else 'within'} the interval).")
    return (f"**Leader: {METHODS[a['method']][0]}**, {d['difference']:.1%} of the teacher ahead of "
            f"{METHODS[b['method']][0]} (paired 95 % interval {d['ci95'][0]:.1%} to {d['ci95'][1]:.1%}: {verdict}).{tail}")


def sweep_table(rows: list[dict], sweep_fraction: float, steps: int, lrs: list[float], best: dict[str, float]) -> str:
    cell = {(r["method"], r["lr"]): r for r in rows if r["fraction"] == sweep_fraction and r["lr"] is not None}
    text = (f"## Learning-rate sweep at {sweep_fraction:.0%} removed (overall score; **bold** = used above)\n\n| method | "
            + " | ".join(f"lr {x:g}" for x in lrs) + " |\n|---|" + "---|" * len(lrs) + "\n")
    for m in DISTILLED:
        vals = []
        for x in lrs:
            r = cell.get((m, x))
            v = "-" if r is None else ("refused" if r["status"] != "ok" else f"{r['eval']['overall']:.3f}")
            vals.append(f"**{v}**" if best.get(m) == x else v)
        text += f"| {METHODS[m][0]} | " + " | ".join(vals) + " |\n"
    return text + "\n"


def plot(by_fraction: dict[float, list[dict]], path: Path, title: str) -> None:
    """Score (share of the teacher) vs kept parameters, one line per method, the paired 95 % interval as a band."""
    from PIL import Image, ImageDraw

    from hpedge.io import atomic_file

    colors = ["#d62728", "#ff7f0e", "#bcbd22", "#e377c2", "#1f77b4", "#2ca02c", "#9467bd", "#7f7f7f"]
    pts: dict[str, list[tuple[float, float, float, float]]] = {}
    for rs in by_fraction.values():
        for r in rs:
            if r["status"] == "ok":
                pts.setdefault(r["method"], []).append((r["kept_ratio"], r["paired"]["ratio"], *r["paired"]["ci95"]))
    W, H, L, R, T, B = 900, 560, 70, 300, 40, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img, "RGBA")
    allx = [p[0] for v in pts.values() for p in v] or [0.5, 1.0]
    ally = [y for v in pts.values() for p in v for y in p[1:]] or [0.5, 1.0]
    x0, x1 = min(allx) - 0.02, max(allx) + 0.02
    y0, y1 = min(0.9, min(ally) - 0.02), max(1.02, max(ally) + 0.01)
    sx = lambda x: L + (x - x0) / (x1 - x0) * (W - L - R)  # noqa: E731
    sy = lambda y: H - B - (y - y0) / (y1 - y0) * (H - T - B)  # noqa: E731
    d.rectangle([L, T, W - R, H - B], outline="black")
    for k in range(6):
        y = y0 + k * (y1 - y0) / 5
        d.line([L - 4, sy(y), L, sy(y)], fill="black")
        d.text((L - 44, sy(y) - 5), f"{y:.0%}", fill="black")
        x = x0 + k * (x1 - x0) / 5
        d.line([sx(x), H - B, sx(x), H - B + 4], fill="black")
        d.text((sx(x) - 12, H - B + 8), f"{x:.0%}", fill="black")
    d.line([L, sy(1.0), W - R, sy(1.0)], fill="#999999")
    d.text((L, 12), title, fill="black")
    d.text(((L + W - R) // 2 - 60, H - 24), "kept transformer parameters", fill="black")
    for i, m in enumerate(m for m in METHODS if m in pts):
        c = colors[i % len(colors)]
        p = sorted(pts[m])
        rgb = tuple(int(c[j:j + 2], 16) for j in (1, 3, 5))
        if len(p) > 1:
            d.polygon([(sx(x), sy(hi)) for x, _, _, hi in p] + [(sx(x), sy(lo)) for x, _, lo, _ in reversed(p)], fill=(*rgb, 40))
            d.line([(sx(x), sy(y)) for x, y, _, _ in p], fill=c, width=2)
        for x, y, lo, hi in p:
            d.line([sx(x), sy(lo), sx(x), sy(hi)], fill=(*rgb, 120))
            d.ellipse([sx(x) - 3, sy(y) - 3, sx(x) + 3, sy(y) + 3], fill=c)
        d.line([W - R + 12, T + 10 + 18 * i, W - R + 32, T + 10 + 18 * i], fill=c, width=3)
        d.text((W - R + 38, T + 4 + 18 * i), METHODS[m][0], fill="black")
    with atomic_file(path) as tmp:
        img.save(tmp, format="PNG")
