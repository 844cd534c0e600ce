"""PNG plots and the HTML summary logged with every clean-compact run.

Inputs are the plain JSON records the steps write (plan, report, per-step metrics), so the
plots can be redrawn from a run's artifacts alone.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_spectra(plan: dict, path: Path) -> Path:
    """Normalized mode-1 singular values per layer, before and after clipping.

    ``plan`` is ``CompactionPlan.to_dict()``; left: the largest normalized value per layer with
    the threshold tau; right: every layer's normalized spectrum (grey before, blue after)."""
    plt = _pyplot()
    layers = [lp for lp in plan["layers"] if lp.get("singular_values") and lp.get("clip")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    tau = plan.get("config", {}).get("tau")
    before_max, after_max, names = [], [], []
    for lp in layers:
        sv = lp["singular_values"][0]
        norm = lp["clip"]["normalizer"][0]
        factors = lp["clip"]["factors"][0]
        before = [v / norm for v in sv]
        after = [v * f / norm for v, f in zip(sv, factors)][: (lp.get("ranks") or [len(sv)])[0]]
        before_max.append(max(before))
        after_max.append(max(after))
        names.append(lp["name"])
        right.plot(before, color="0.6", lw=0.8)
        right.plot(after, color="tab:blue", lw=0.8)
    x = range(len(names))
    left.plot(x, before_max, "o-", color="0.5", label="before clipping")
    left.plot(x, after_max, "o-", color="tab:blue", label="after clipping")
    if tau:
        left.axhline(tau, color="tab:red", ls="--", label=f"tau = {tau:g}")
    left.set_xticks(list(x), names, rotation=90, fontsize=6)
    left.set_ylabel("max normalized singular value")
    left.set_title("Largest normalized singular value per layer")
    left.legend(fontsize=8)
    right.set_yscale("log")
    right.set_xlabel("index")
    right.set_ylabel("normalized singular value")
    right.set_title("Spectra (grey: original; blue: clipped, kept ranks)")
    return _save(fig, path)


def plot_histograms(before: list[int] | None, after: list[int] | None, class_names: list[str],
                    path: Path) -> Path:
    """Class histogram of adversarial synthetic images, original model vs cleaned model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    n = len(before or after or [])
    width = 0.4
    if before is not None:
        ax.bar([i - width / 2 for i in range(n)], before, width, color="tab:red", label="original")
    if after is not None:
        ax.bar([i + width / 2 for i in range(n)], after, width, color="tab:blue", label="cleaned")
    ax.set_xticks(range(n), class_names[:n] if class_names else range(n), rotation=45, fontsize=8)
    ax.set_ylabel("adversarial images")
    ax.set_title("Where untargeted adversarial synthetic images land")
    ax.legend()
    return _save(fig, path)


def plot_steps(steps: list[dict], path: Path) -> Path:
    """ACC and ASR after each step (``[{"step", "acc", "asr"}, ...]``, fractions)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [s["step"] for s in steps]
    for key, color in (("acc", "tab:green"), ("asr", "tab:red")):
        values = [None if s.get(key) is None else 100 * s[key] for s in steps]
        if any(v is not None for v in values):
            ax.plot(labels, [float("nan") if v is None else v for v in values], "o-", color=color,
                    label=key.upper())
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    ax.set_title("ACC / ASR by step")
    ax.legend()
    return _save(fig, path)


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" style="max-width:100%">'


def summary_html(report: dict, gates: dict, source: dict, plots: list[Path], status: str) -> str:
    """One self-contained page (plots inlined) for the MLflow UI's artifact view."""
    m, model, onnx = report["metrics"], report["model"], report.get("onnx") or {}
    scan, t = report.get("scan") or {}, report.get("timings_s") or {}
    rows = [("parameters", f"{model['params_before']:,}", f"{model['params_after']:,}"),
            ("MACs", f"{model['macs_before']:,}", f"{model['macs_after']:,}"),
            ("clean accuracy (ACC)", _pct(m.get("acc_before")), _pct(m.get("acc_after"))),
            ("attack success rate (ASR)", _pct(m.get("asr_before")), _pct(m.get("asr_after"))),
            ("robust accuracy (RA)", _pct(m.get("ra_before")), _pct(m.get("ra_after"))),
            ("scan concentration", _fmt(scan.get("concentration_before")), _fmt(scan.get("concentration_after")))]
    lat = onnx.get("latency_ms") or {}
    if lat:
        rows.append((f"onnxruntime latency, batch {onnx.get('latency_batch')} (ms)",
                     f"{lat['original']:.2f}", f"{lat['compact']:.2f}"))
    out = io.StringIO()
    w = out.write
    w("<!doctype html><html><head><meta charset='utf-8'><title>cleancompact run</title><style>"
      "body{font-family:sans-serif;margin:1.5em;max-width:70em}table{border-collapse:collapse;margin:1em 0}"
      "td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}th{background:#f3f3f3}"
      "td:first-child{text-align:left}.passed{color:#1a7f37}.failed{color:#cf222e;font-weight:bold}"
      ".skipped,.disabled{color:#777}</style></head><body>")
    w(f"<h1>Clean &amp; Compact: {html.escape(status)}</h1>")
    w(f"<p>Source <code>{html.escape(source['uri'])}</code> (sha256 {source['sha256'][:12]}), "
      f"architecture <b>{html.escape(model['arch'])}</b>, compression {model['compression']:.2f}x.</p>")
    w("<table><tr><th></th><th>original</th><th>cleaned</th></tr>")
    for name, a, b in rows:
        w(f"<tr><td>{html.escape(name)}</td><td>{a}</td><td>{b}</td></tr>")
    w("</table>")
    if onnx:
        w(f"<p>ONNX parity (max abs diff) {onnx['max_abs_diff']:.2e}; onnxruntime speed-up "
          f"{onnx['speedup']:.2f}x at batch {onnx['latency_batch']}, {onnx.get('speedup_batch1', 0):.2f}x at "
          f"batch 1 ({onnx['threads']} threads, measured side by side).</p>")
    w("<h2>Gates</h2><table><tr><th>gate</th><th>value</th><th>limit</th><th>status</th></tr>")
    for name, g in gates.items():
        w(f"<tr><td>{name}</td><td>{_fmt(g['value'])}</td><td>{_fmt(g['limit'])}</td>"
          f"<td class='{g['status']}'>{g['status']}</td></tr>")
    w("</table><h2>Time per step</h2><table><tr><th>step</th><th>seconds</th></tr>")
    w("".join(f"<tr><td>{html.escape(k)}</td><td>{v:.1f}</td></tr>" for k, v in t.items() if v is not None))
    w("</table>")
    for p in plots:
        w(f"<h2>{html.escape(p.stem.replace('_', ' '))}</h2>{_img(p)}")
    w("</body></html>\n")
    return out.getvalue()


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4g}" if isinstance(v, float) else str(v)
