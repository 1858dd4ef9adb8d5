"""``fairsplit report``: one self-contained HTML page on finished runs, for a compliance reviewer.

No network: the charts are matplotlib PNGs embedded as data URIs, the style is inline. For each
run folder (``fairsplit run`` / ``developer`` output) the page shows:

* headline metrics with fairlearn's names and a one-line definition of each;
* the per-group table and bar charts (selection rate, TPR, FPR, accuracy);
* per-round curves of validation accuracy and the gaps;
* accuracy against each gap across the runs given;
* what crossed the wire, from the audit logs: bytes per direction and message type, and whether
  the developer's and the auditor's logs agree payload by payload (when the auditor's log is at
  hand: ``RUN_DIR/auditor/audit.jsonl``, a local run's default ``state_dir``, or ``--auditor-log``);
* the experiment fingerprint, the privacy record and the SHA-256 of the Flower App bundle.

Every number is read from the run's own files; nothing is recomputed from data.
"""

from __future__ import annotations

import base64
import html
import io
import json
from datetime import datetime, timezone
from pathlib import Path

from fairsplit.protocol.fileio import atomic_write_bytes
from fairsplit.protocol.metrics import METRIC_DEFINITIONS
from fairsplit.protocol.privacy import epsilon_meaning

__all__ = ["build_report", "compare_logs", "load_run"]

GAPS = ("demographic_parity_difference", "equalized_odds_difference", "equal_opportunity_difference")
GROUP_BARS = (("selection_rate", "selection rate"), ("tpr", "TPR"), ("fpr", "FPR"), ("accuracy", "accuracy"))


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def load_run(folder: Path, auditor_log: Path | None = None) -> dict:
    """A run folder's ``results.json``, ``metrics.jsonl``, ``audit.jsonl`` and the auditor's log.

    Raises:
        FileNotFoundError: the folder has no ``results.json`` (not a finished run).
        ValueError: ``results.json`` is not valid JSON.
    """
    folder = Path(folder)
    path = folder / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no results.json (is it a finished fairsplit run?)")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    aud = auditor_log or folder / "auditor" / "audit.jsonl"
    return {"folder": folder, "results": results, "rows": _jsonl(folder / "metrics.jsonl"),
            "audit": _jsonl(folder / "audit.jsonl"),
            "auditor_audit": _jsonl(aud) if Path(aud).is_file() else None, "auditor_log": aud}


def compare_logs(dev: list[dict], aud: list[dict] | None, fingerprint: str | None) -> dict:
    """Whether the developer's and the auditor's audit logs agree payload by payload.

    The auditor's lines of this experiment (``fingerprint``) are matched in order: the
    developer's ``sent`` against the auditor's ``received`` and the reverse, on (message type,
    round, bytes, SHA-256). Refusals the auditor logged without a reply are left out. Returns
    ``{"status": "agree" | "differ" | "no auditor log", "payloads": n, "first_difference": ...}``.
    """
    if aud is None:
        return {"status": "no auditor log", "payloads": 0, "first_difference": None}
    key = lambda r: (r.get("message_type"), r.get("round"), r.get("bytes"), r.get("sha256"))  # noqa: E731
    mine = [r for r in aud if r.get("fingerprint") in (None, fingerprint) and "error" not in r]
    pairs = [([key(r) for r in dev if r["direction"] == "sent"], [key(r) for r in mine if r["direction"] == "received"]),
             ([key(r) for r in dev if r["direction"] == "received"], [key(r) for r in mine if r["direction"] == "sent"])]
    n = 0
    for a, b in pairs:
        # the auditor may have answered this experiment in earlier runs too: compare the tail
        b = b[len(b) - len(a):] if len(b) >= len(a) else b
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return {"status": "differ", "payloads": n + i, "first_difference": {"developer": x, "auditor": y}}
        if len(a) != len(b):
            return {"status": "differ", "payloads": n + min(len(a), len(b)),
                    "first_difference": {"developer": len(a), "auditor": len(b)}}
        n += len(a)
    return {"status": "agree", "payloads": n, "first_difference": None}


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _img(uri: str, alt: str) -> str:
    return f'<img class="chart" alt="{html.escape(alt)}" src="{uri}">'


def _fmt(v) -> str:
    return "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else html.escape(str(v)))


def _label(run: dict, i: int) -> str:
    r = run["results"]
    return f"{i + 1}. {r.get('method')} ({Path(run['folder']).name})"


def _group_chart(run: dict, label: str) -> str:
    import matplotlib.pyplot as plt
    import numpy as np

    groups = (run["results"].get("metrics") or {}).get("per_group") or {}
    names = sorted(groups)
    fig, ax = plt.subplots(figsize=(6.5, 3))
    width = 0.8 / len(GROUP_BARS)
    x = np.arange(len(names))
    for k, (key, title) in enumerate(GROUP_BARS):
        ax.bar(x + k * width, [groups[g].get(key) or 0.0 for g in names], width, label=title)
    ax.set_xticks(x + width * (len(GROUP_BARS) - 1) / 2, names)
    ax.set_ylim(0, 1)
    ax.set_title(f"{label}: test metrics by group")
    ax.legend(fontsize=7, ncol=4)
    return _img(_png(fig), f"{label} per-group bar chart")


def _curves(runs: list[dict]) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(GAPS), figsize=(12, 3))
    for i, run in enumerate(runs):
        rows = [r for r in run["rows"] if r.get("val")]
        rounds = [r["round"] for r in rows]
        for ax, key in zip(axes, ("accuracy", *GAPS)):
            ax.plot(rounds, [r["val"].get(key) for r in rows], marker="o", label=_label(run, i))
    for ax, key in zip(axes, ("accuracy", *GAPS)):
        ax.set_title(key.replace("_", " "), fontsize=9)
        ax.set_xlabel("round")
    axes[0].legend(fontsize=7)
    return _img(_png(fig), "per-round validation curves")


def _tradeoff(runs: list[dict]) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(GAPS), figsize=(12, 3))
    for ax, gap in zip(axes, GAPS):
        for i, run in enumerate(runs):
            m = run["results"].get("metrics") or {}
            if m.get(gap) is not None and m.get("accuracy") is not None:
                ax.scatter([m[gap]], [m["accuracy"]], s=60, label=_label(run, i))
        ax.set_xlabel(gap.replace("_", " "))
        ax.set_ylabel("accuracy")
    axes[0].legend(fontsize=7)
    return _img(_png(fig), "accuracy against each gap across runs")


def _wire(run: dict) -> str:
    by: dict[tuple, list[int]] = {}
    for r in run["audit"]:
        k = (r["direction"], r["message_type"])
        by.setdefault(k, [0, 0])
        by[k][0] += 1
        by[k][1] += int(r.get("bytes") or 0)
    rows = "".join(f"<tr><td>{'developer → auditor' if d == 'sent' else 'auditor → developer'}</td>"
                   f"<td>{html.escape(t)}</td><td>{n}</td><td>{b:,}</td></tr>" for (d, t), (n, b) in sorted(by.items()))
    cmp = compare_logs(run["audit"], run["auditor_audit"], run["results"].get("fingerprint"))
    if cmp["status"] == "agree":
        verdict = f"the developer's and the auditor's logs agree on all {cmp['payloads']} payloads " \
                  "(message type, round, bytes, SHA-256)"
    elif cmp["status"] == "differ":
        verdict = f"the logs DIFFER after {cmp['payloads']} matching payloads: {html.escape(str(cmp['first_difference']))}"
    else:
        verdict = f"the auditor's log is not at hand ({html.escape(str(run['auditor_log']))}); only the developer's is shown"
    return (f"<table><tr><th>direction</th><th>message type</th><th>payloads</th><th>bytes</th></tr>{rows}</table>"
            f'<p class="verdict" data-logs="{cmp["status"]}">{verdict}</p>')


def build_report(run_dirs: list[Path], out: Path, auditor_log: Path | None = None) -> Path:
    """Write the HTML report on ``run_dirs`` to ``out`` (atomically); returns ``out``.

    ``auditor_log``: the auditor's ``audit.jsonl`` when it is not in ``RUN_DIR/auditor/``.

    Raises:
        FileNotFoundError / ValueError: a folder is not a finished run (see :func:`load_run`).
        ValueError: no folder given.
    """
    if not run_dirs:
        raise ValueError("give at least one run folder")
    import matplotlib

    matplotlib.use("Agg")
    from fairsplit.auditor.executor import fab_sha256

    from .flower import APP_DIR

    runs = [load_run(Path(d), auditor_log) for d in run_dirs]
    defs = "".join(f"<tr><td><code>{k}</code></td><td>{html.escape(v)}</td></tr>" for k, v in METRIC_DEFINITIONS.items())
    head_keys = ("accuracy", "worst_group_accuracy", *GAPS)
    heads = "".join(f"<th>{html.escape(k.replace('_', ' '))}</th>" for k in head_keys)
    rows, meanings = [], []
    for i, run in enumerate(runs):
        r, m = run["results"], run["results"].get("metrics") or {}
        p = r.get("privacy") or {}
        if p.get("dp"):
            meanings.append(f"{_label(run, i)}: {epsilon_meaning(p['epsilon_run'], p['delta'])}.")
        eps = f"ε = {p['epsilon_run']:.2f} (δ = {p['delta']:g})" if p.get("dp") else "exact releases"
        rows.append(f"<tr><td>{html.escape(_label(run, i))}</td><td>{html.escape(str(r.get('dataset')))}</td>"
                    f"<td>{html.escape(str(r.get('transport')))}</td>"
                    + "".join(f"<td>{_fmt(m.get(k))}</td>" for k in head_keys) + f"<td>{html.escape(eps)}</td></tr>")
    sections = []
    for i, run in enumerate(runs):
        r, m = run["results"], run["results"].get("metrics") or {}
        groups = m.get("per_group") or {}
        table = "".join(f"<tr><td>{html.escape(g)}</td><td>{s.get('n')}</td>"
                        + "".join(f"<td>{_fmt(s.get(k))}</td>" for k in ("accuracy", "selection_rate", "tpr", "fpr"))
                        + "</tr>" for g, s in sorted(groups.items()))
        sections.append(
            f"<section><h2>{html.escape(_label(run, i))}</h2>"
            f"<p>experiment fingerprint <code>{html.escape(str(r.get('fingerprint')))}</code>; "
            f"{r.get('rounds')} rounds; wall time {_fmt(r.get('wall_time_s'))} s; test part n = {m.get('n')}</p>"
            + ("<h3>By sensitive group (test)</h3><table><tr><th>group</th><th>n</th><th>accuracy</th>"
               f"<th>selection rate</th><th>TPR</th><th>FPR</th></tr>{table}</table>"
               f"{_group_chart(run, _label(run, i))}" if groups else
               "<h3>By sensitive group (test)</h3><p>Not released: under the auditor's differential "
               "privacy the per-group table stays with the auditor.</p>")
            + f"<h3>What crossed the wire</h3>{_wire(run)}</section>")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fairsplit fairness report</title>
<style>body{{font-family:sans-serif;max-width:1250px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}img.chart{{display:block;max-width:100%;margin:.5em 0}}
.verdict{{font-weight:bold}}code{{font-size:90%}}.defs td{{text-align:left}}</style></head>
<body>
<h1>fairsplit fairness report</h1>
<p>{len(runs)} run(s), generated {datetime.now(timezone.utc).isoformat(timespec="seconds")}. Every number is an
aggregate the auditor released (under differential privacy, computed from noisy counts) or the
developer's own record; no attribute and no individual prediction is in this page.
Flower App bundle SHA-256 (the build the auditor approves by default): <code>{fab_sha256(APP_DIR)}</code>.</p>
<h2>Headline (test part)</h2>
<table><tr><th>run</th><th>dataset</th><th>transport</th>{heads}<th>privacy</th></tr>{''.join(rows)}</table>
{"".join(f"<p class='privacy'>{html.escape(s)}</p>" for s in meanings)}
<h3>Definitions (fairlearn)</h3><table class="defs">{defs}</table>
<h2>Per-round validation curves</h2>{_curves(runs)}
<h2>Accuracy against each gap, across runs</h2>{_tradeoff(runs)}
{''.join(sections)}
<script>window.addEventListener("load",function(){{var ok=0;document.querySelectorAll("img.chart").forEach(function(i){{if(i.complete&&i.naturalWidth>0)ok++;}});document.body.setAttribute("data-charts-ok",ok+"/"+document.querySelectorAll("img.chart").length);}});</script>
</body></html>
"""
    out = Path(out)
    atomic_write_bytes(out, page.encode("utf-8"), mode=0o644)
    return out
