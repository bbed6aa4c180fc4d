"""Reports: JSON with every number and its settings, markdown + PNG plots + an HTML page with
the PNGs embedded, and a side-by-side comparison of runs against LingBot-World's Table 2."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from titan_world.eval import plots
from titan_world.eval.video_io import read_video

SHORT = {
    "imaging_quality": "IQ",
    "aesthetic_quality": "AQ",
    "dynamic_degree": "DD",
    "motion_smoothness": "MS",
    "temporal_flickering": "TF",
    "overall_consistency": "OC",
}
TABLE_ORDER = [
    "imaging_quality",
    "aesthetic_quality",
    "dynamic_degree",
    "motion_smoothness",
    "temporal_flickering",
    "overall_consistency",
]
# LingBot-World technical report, Table 2 (VBench, 100 generated videos longer than 30 s).
PUBLISHED: dict[str, dict[str, float]] = {
    "LingBot-World (published)": {
        "imaging_quality": 0.6683,
        "aesthetic_quality": 0.5660,
        "dynamic_degree": 0.8857,
        "motion_smoothness": 0.9895,
        "temporal_flickering": 0.9648,
        "overall_consistency": 0.2178,
    },
    "HY-World 1.5 (published)": {
        "imaging_quality": 0.6512,
        "aesthetic_quality": 0.5487,
        "dynamic_degree": 0.7217,
        "motion_smoothness": 0.9897,
        "temporal_flickering": 0.9773,
        "overall_consistency": 0.2016,
    },
    "Yume-1.5 (published)": {
        "imaging_quality": 0.5838,
        "aesthetic_quality": 0.5185,
        "dynamic_degree": 0.7612,
        "motion_smoothness": 0.9709,
        "temporal_flickering": 0.9545,
        "overall_consistency": 0.1994,
    },
}
REFERENCE = "LingBot-World (published)"
# How the published numbers were computed: per-video scores averaged over clips (their dynamic
# degree values 0.8857 / 0.7612 / 0.7217 are not multiples of 1/100 videos, so not whole-video 0/1).
PUBLISHED_PROTOCOL = "clip-averaged (VBench-Long style; compare with --protocol vbench-long)"


def _clean(x: Any) -> Any:
    """JSON-safe: numpy -> python, NaN/inf -> None."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def write_json(data: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(data), indent=2, allow_nan=False))
    return path


def load_results(path: str | Path) -> dict[str, Any]:
    """A results JSON, or a folder holding results.json / action_following.json."""
    p = Path(path)
    if p.is_dir():
        for name in ("results.json", "action_following.json"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise FileNotFoundError(f"{path}: no results.json or action_following.json in this folder")
    if not p.is_file():
        raise FileNotFoundError(f"results file {p} does not exist")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON: {e}") from e


def _fmt(v: Any) -> str:
    return "—" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def _html(md_title: str, sections: list[tuple[str, str]], images: list[Path]) -> str:
    """A self-contained HTML page: text sections (pre-formatted markdown) + embedded PNGs."""
    parts = [f"<html><head><meta charset='utf-8'><title>{md_title}</title></head><body>", f"<h1>{md_title}</h1>"]
    for head, body in sections:
        parts.append(f"<h2>{head}</h2><pre>{body}</pre>")
    for img in images:
        b64 = base64.b64encode(img.read_bytes()).decode()
        parts.append(f"<h3>{img.name}</h3><img src='data:image/png;base64,{b64}'/>")
    return "\n".join(parts + ["</body></html>"])


# ------------------------------------------------------------------------------------ vbench


def write_vbench_report(results: dict[str, Any], out_dir: str | Path, filmstrip_videos: int = 4) -> dict[str, Path]:
    """results.json, report.md, report.html, plots/*.png (windows over time, filmstrips)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": write_json(results, out / "results.json")}
    dims, vids = results["dimensions"], results["videos"]
    lines = [
        f"# VBench evaluation ({results['settings'].get('protocol', 'vbench')} protocol)",
        "",
        f"{len(vids)} videos; created {results.get('created', '')}.",
        "",
        "| dimension | mean | videos | status |",
        "|---|---|---|---|",
    ]
    for d, info in dims.items():
        status = "ok" if info["status"] == "ok" else f"skipped: {info['reason']}"
        lines.append(f"| {d} | {_fmt(info.get('mean'))} | {info.get('num_videos', 0)} | {status} |")
    ref = PUBLISHED[REFERENCE]
    lines += [
        "",
        f"Reference ({REFERENCE}): " + ", ".join(f"{SHORT[k]} {v:.4f}" for k, v in ref.items()),
        "",
        "## Per video",
        "",
        "| video | " + " | ".join(SHORT.get(d, d) for d in dims) + " | frames | fps |",
        "|---" * (len(dims) + 3) + "|",
    ]
    for name, r in vids.items():
        cells = [_fmt(r["scores"].get(d)) if d in r["scores"] else ("err" if d in r["errors"] else "—") for d in dims]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['frames']} | {_fmt(r['fps'])} |")
    errors = [(n, d, m) for n, r in vids.items() for d, m in r["errors"].items()]
    if errors:
        lines += ["", "## Errors", ""] + [f"- {n} / {d}: {m}" for n, d, m in errors]
    failed = results.get("failed_videos") or {}
    if failed:
        lines += ["", f"## Videos not scored ({len(failed)}: not in any mean)", ""]
        lines += [f"- {n}: {f['reason']}" for n, f in failed.items()]
    images: list[Path] = []
    for d, info in dims.items():
        wm = info.get("window_mean")
        if not wm:
            continue
        series = {"mean over videos": (wm["start_s"], wm["mean"])}
        for name, r in list(vids.items())[:8]:
            if d in r["windows"]:
                series[name] = (r["windows"][d]["start_s"], r["windows"][d]["values"])
        images.append(
            plots.line_plot(
                series,
                out / "plots" / f"windows_{d}.png",
                title=f"{d} per {results['settings']['window_seconds']} s window",
                xlabel="window start (s)",
                ylabel=SHORT.get(d, d),
            )
        )
    strips = _vbench_filmstrips(vids, out / "plots", filmstrip_videos)
    images += strips
    if images:
        lines += ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in images]
    lines += ["", "## Settings", "", "```json", json.dumps(_clean(results["settings"]), indent=2), "```"]
    md = "\n".join(lines) + "\n"
    files["md"] = out / "report.md"
    files["md"].write_text(md)
    files["html"] = out / "report.html"
    files["html"].write_text(_html("VBench evaluation", [("Report", md)], images))
    return files


def _vbench_filmstrips(vids: dict[str, Any], plot_dir: Path, n: int) -> list[Path]:
    rows, fps = {}, None
    for name, r in list(vids.items())[:n]:
        try:
            frames, fps = read_video(r["path"])
        except (FileNotFoundError, ValueError):
            continue
        rows[name] = frames
    if not rows:
        return []
    return [plots.filmstrip(rows, plot_dir / "filmstrip.png", fps=fps)]


# -------------------------------------------------------------------------- action following


def write_action_report(
    report: dict[str, Any],
    out_dir: str | Path,
    frames: dict[str, np.ndarray] | None = None,
    stream_frames: dict[str, np.ndarray] | None = None,
    fps: float | None = None,
) -> dict[str, Path]:
    """action_following.json/.md + index.html (PSNR-over-time and yaw-drift plots, drift windows
    and revisits when the report has them, a filmstrip of `frames`, e.g. {'simulator': ...,
    'model': ...} uint8 [T, H, W, 3], and one of the long `stream_frames`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": write_json(report, out / "action_following.json")}
    fe, s = report["frame_error"], report["settings"]
    c = s["context_frames"]
    lines = [
        "# Action following (synthetic world)",
        "",
        f"{s['num_frames']} frames, {c} context frame(s), {s['scored_frames']} scored; frames in 0..1.",
        "",
        "| rollout | PSNR (dB) | MSE | MAE |",
        "|---|---|---|---|",
    ]
    for k, v in fe.items():
        lines.append(f"| {k} | {v['psnr']:.2f} | {v['mse']:.5f} | {v['mae']:.5f} |")
    lines += ["", "PSNR margin of the model: " + ", ".join(f"{k} {v:+.2f} dB" for k, v in report["beats"].items())]
    cam = report.get("camera")
    images = []
    if cam:
        lines += [
            "",
            f"## Camera (reference: {cam['reference']})",
            "",
            "| rollout | yaw MAE (deg/frame) | yaw drift (deg) | forward sign agreement | forward corr |",
            "|---|---|---|---|---|",
        ]
        for k, v in cam.items():
            if isinstance(v, dict) and "yaw_mae_deg" in v:
                lines.append(
                    f"| {k} | {_fmt(v['yaw_mae_deg'])} | {_fmt(v['yaw_drift_deg'])} | "
                    f"{_fmt(v['forward_sign_agreement'])} | {_fmt(v['forward_corr'])} |"
                )
        series = {
            k: (list(range(c, c + len(v["yaw_cum_err_per_pair_deg"]))), v["yaw_cum_err_per_pair_deg"])
            for k, v in cam.items()
            if isinstance(v, dict) and "yaw_cum_err_per_pair_deg" in v
        }
        images.append(
            plots.line_plot(
                series, out / "plots" / "yaw_drift.png", title="cumulative yaw error", xlabel="frame", ylabel="deg"
            )
        )
    drift = report.get("drift")
    if drift and drift["windows"]:
        ratio = drift["last_over_first"]
        lines += [
            "",
            f"## Drift over the stream ({drift['window_seconds']:g} s windows)",
            "",
            "detail = the model's high-frequency energy / the simulator's; colour = histogram distance "
            "(0 same, 1 disjoint).",
            "",
            "| window | detail | colour | PSNR (dB) |",
            "|---|---|---|---|",
        ]
        for w in drift["windows"]:
            lines.append(
                f"| {w['start_s']:.1f}-{w['end_s']:.1f} s | {w['detail_ratio']:.3f} | "
                f"{w['colour_hist_distance']:.3f} | {w['psnr']:.2f} |"
            )
        lines += ["", "last window / first window: " + ", ".join(f"{k} {_fmt(v)}" for k, v in ratio.items())]
        starts = [w["start_s"] for w in drift["windows"]]
        images.append(
            plots.line_plot(
                {k: (starts, [w[k] for w in drift["windows"]]) for k in ("detail_ratio", "colour_hist_distance")},
                out / "plots" / "drift_windows.png",
                title="drift per window",
                xlabel="window start (s)",
                ylabel="ratio / distance",
            )
        )
    rv = report.get("revisits")
    if rv:
        lines += [
            "",
            f"## Revisits (within {rv['radius_m']:g} m and {rv['max_yaw_deg']:g} deg of a frame at least "
            f"{rv['min_gap_seconds']:g} s earlier)",
            "",
            f"{rv['frames']['revisit']} revisit frames, {rv['frames']['first_visit']} first-visit frames.",
            "",
            "| rollout | PSNR at revisits (dB) | PSNR at first visits (dB) |",
            "|---|---|---|",
        ]
        for k in ("model", "copy_last"):
            lines.append(f"| {k} | {_fmt(rv[k]['revisit']['psnr'])} | {_fmt(rv[k]['first_visit']['psnr'])} |")
    xs = list(range(c, s["num_frames"]))
    images.insert(
        0,
        plots.line_plot(
            {k: (xs, v["psnr_per_frame"]) for k, v in fe.items()},
            out / "plots" / "psnr_over_time.png",
            title="PSNR vs simulator",
            xlabel="frame",
            ylabel="dB",
        ),
    )
    if frames:
        images.append(plots.filmstrip(frames, out / "plots" / "action_filmstrip.png", fps=fps))
    if stream_frames:
        images.append(plots.filmstrip(stream_frames, out / "plots" / "stream_filmstrip.png", num=10, fps=fps))
    lines += ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in images]
    md = "\n".join(lines) + "\n"
    files["md"] = out / "action_following.md"
    files["md"].write_text(md)
    files["html"] = out / "index.html"
    files["html"].write_text(_html("Action following", [("Report", md)], images))
    return files


# ---------------------------------------------------------------------------------- compare


def compare_runs(runs: list[str | Path], out_dir: str | Path, names: list[str] | None = None) -> dict[str, Path]:
    """Side-by-side table (compare.md/.json/.html + bar chart) of VBench runs and Table 2."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, float | None]] = {}
    sources: dict[str, str] = {}
    protocols: dict[str, str] = {}
    for i, r in enumerate(runs):
        res = load_results(r)
        if res.get("kind") != "titan-world-eval/vbench":
            raise ValueError(f"{r}: not a VBench results file (kind={res.get('kind')!r})")
        rp = Path(r)
        auto = rp.parent.name if rp.is_file() and rp.stem == "results" else rp.stem if rp.is_file() else rp.name
        name = names[i] if names and i < len(names) else auto
        while name in rows:
            name += "'"
        rows[name] = {
            d: (info.get("mean") if info.get("status") == "ok" else None) for d, info in res["dimensions"].items()
        }
        sources[name] = str(r)
        protocols[name] = res.get("settings", {}).get("protocol", "vbench")
    table = {**rows, **PUBLISHED}
    protocols.update({name: PUBLISHED_PROTOCOL for name in PUBLISHED})
    lines = [
        "# VBench comparison",
        "",
        "| run | " + " | ".join(SHORT[d] for d in TABLE_ORDER) + " | protocol |",
        "|---" * (len(TABLE_ORDER) + 2) + "|",
    ]
    for name, vals in table.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(vals.get(d)) for d in TABLE_ORDER) + f" | {protocols[name]} |")
    ref = PUBLISHED[REFERENCE]
    lines += [
        "",
        f"Difference to {REFERENCE} (run − reference):",
        "",
        "| run | " + " | ".join(SHORT[d] for d in TABLE_ORDER) + " |",
        "|---" * (len(TABLE_ORDER) + 1) + "|",
    ]
    for name, vals in rows.items():
        lines.append(
            f"| {name} | "
            + " | ".join("—" if vals.get(d) is None else f"{vals[d] - ref[d]:+.4f}" for d in TABLE_ORDER)
            + " |"
        )
    lines += [
        "",
        "Published rows: LingBot-World technical report, Table 2 (VBench on 100 generated "
        f"videos longer than 30 s), protocol {PUBLISHED_PROTOCOL}; '—' = dimension skipped or not run.",
    ]
    if any(p != "vbench-long" for n, p in protocols.items() if n in rows):
        lines += [
            "",
            "Note: runs scored with the whole-video `vbench` protocol are not directly comparable with "
            "the clip-averaged published rows (dynamic degree most of all).",
        ]
    lines += [""]
    chart = plots.bar_chart(
        [SHORT[d] for d in TABLE_ORDER],
        {n: [v.get(d) for d in TABLE_ORDER] for n, v in {**rows, REFERENCE: ref}.items()},
        out / "plots" / "compare.png",
        title="VBench dimensions",
    )
    lines += [f"![compare](plots/{chart.name})"]
    md = "\n".join(lines) + "\n"
    files = {
        "json": write_json(
            {
                "kind": "titan-world-eval/compare",
                "runs": rows,
                "sources": sources,
                "protocols": protocols,
                "published": PUBLISHED,
                "reference": REFERENCE,
            },
            out / "compare.json",
        )
    }
    files["md"] = out / "compare.md"
    files["md"].write_text(md)
    files["html"] = out / "compare.html"
    files["html"].write_text(_html("VBench comparison", [("Table", md)], [chart]))
    return files


def write_report(results: dict[str, Any] | str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Render any results (dict or JSON path) by its kind: vbench or action-following."""
    res = results if isinstance(results, dict) else load_results(results)
    kind = res.get("kind")
    if kind == "titan-world-eval/vbench":
        return write_vbench_report(res, out_dir)
    if kind == "titan-world-eval/action-following":
        return write_action_report(res, out_dir)
    raise ValueError(f"unknown results kind {kind!r}: expected a VBench or action-following results JSON")
