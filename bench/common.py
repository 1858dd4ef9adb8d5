"""Helpers shared by the benchmarks in ``bench/`` (run them as ``python bench/<name>.py``).

Each benchmark prints a human-readable table and, as its very last line, one ``name=value``
figure, so a script (or a test) can read the result with ``out.strip().splitlines()[-1]``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

#: Repository root (``bench/..``) and the shared data folder beside it (may be absent).
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

__all__ = ["REPO", "SHARED", "group_names", "machine_info", "print_table", "write_json"]


def machine_info() -> dict[str, Any]:
    """CPU model, core count, memory, thread settings and library versions of this machine."""
    import flwr
    import peft
    import timm
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    mem_gib = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "mem_gib": mem_gib,
        "load_1min": load,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "peft": peft.__version__,
        "flwr": flwr.__version__,
    }


def group_names(data_cfg: Any) -> list[str]:
    """The auditor's sensitive group names for a data config, without reading the data.

    Only the report's size depends on them (its ``per_group`` keys). CSV sources name their groups
    only in the data, so two generic names stand in.
    """
    from fairsplit.protocol.config import AdultData, SyntheticData, UTKFaceData
    from fairsplit.protocol.data import UTK_RACES

    if isinstance(data_cfg, SyntheticData):
        return ["group_a", "group_b"]
    if isinstance(data_cfg, UTKFaceData):
        kind = data_cfg.sensitive
        if kind == "gender":
            return ["male", "female"]
        if kind == "race":
            return list(UTK_RACES)
        if kind == "race_binary":
            return ["White", "non-White"]
        bins = data_cfg.age_bins
        return [f"{a}-{b - 1}" for a, b in zip(bins, bins[1:])]
    if isinstance(data_cfg, AdultData):
        values = {"sex": ["Male", "Female"],
                  "race": ["White", "Black", "Asian-Pac-Islander", "Amer-Indian-Eskimo", "Other"]}
        names = [""]
        for col in data_cfg.sensitive or ["sex"]:
            names = [f"{a}|{b}" if a else b for a in names for b in values[col]]
        return names
    return ["group_0", "group_1"]


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> None:
    """Print ``rows`` as a Markdown table; ``columns`` is a list of (key, header)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 100 else f"{v:,.1f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    print("| " + " | ".join(h for _, h in columns) + " |")
    first = rows[0] if rows else {}
    print("|" + "|".join(" :--- " if isinstance(first.get(k), str) else " ---: " for k, _ in columns) + "|")
    for r in rows:
        print("| " + " | ".join(cell(r.get(k, "")) for k, _ in columns) + " |")


def write_json(path: str | Path, data: dict) -> None:
    """Write ``data`` as indented JSON (parents created)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=2, default=str) + "\n")
