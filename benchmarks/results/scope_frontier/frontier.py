"""Every single-edit full-suite run on record: T-Generality against near-miss locality, with #20's bars.

Reads the committed ``results.json`` files under ``benchmarks/results`` (nothing is typed in by hand), keeps the
single-edit rows of methods that state no consequence (the bar is for plain edits), and writes ``frontier.md``
(one row per run and method, with the file it came from) and ``frontier.png``.

    python benchmarks/results/scope_frontier/frontier.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent
BAR_T_GEN, BAR_NEAR_MISS = 0.95, 0.97


def rows() -> list[dict]:
    """Single-edit rows; sequential runs' folders are skipped (their single-edit table holds one edit, not a split)."""
    out = []
    for path in sorted(RESULTS.rglob("results.json")):
        rel = path.relative_to(RESULTS)
        if rel.parts[0] == "superseded" or any(p in ("full_seq", "seq") for p in rel.parts):
            continue
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("suite") != "full":
            continue
        for method, entry in (data.get("methods") or {}).items():
            single = entry.get("single", entry) if isinstance(entry, dict) else None
            if not isinstance(single, dict) or "consequences" in method:
                continue
            t_gen, near = single.get("t_generality"), single.get("near_miss_locality")
            if t_gen is None or near is None:
                continue
            out.append({"file": str(rel), "split": data.get("split"), "method": method,
                        "t_generality": t_gen, "near_miss_locality": near,
                        "coupled_locality": single.get("coupled_locality")})
    return out


def _scatter(ax, found: list[dict], min_t_gen: float = 0.0, label: bool = True) -> None:
    for split, marker, color in (("dev", "o", "tab:blue"), ("test", "s", "tab:red")):
        pts = [r for r in found if r["split"] == split and r["t_generality"] > min_t_gen]
        ax.scatter([r["t_generality"] for r in pts], [r["near_miss_locality"] for r in pts], marker=marker,
                   color=color, alpha=0.7, label=f"{split} ({len(pts)} runs)" if label else None)


def main() -> None:
    found = rows()
    meets = [r for r in found if r["t_generality"] >= BAR_T_GEN and r["near_miss_locality"] >= BAR_NEAR_MISS]
    lines = ["| split | method | T-Generality | near-miss | coupled | meets both bars | file |",
             "|---|---|---:|---:|---:|---|---|"]
    for r in sorted(found, key=lambda r: (r["split"], -r["near_miss_locality"])):
        ok = "yes" if r in meets else "no"
        coupled = "–" if r["coupled_locality"] is None else f"{r['coupled_locality']:.3f}"
        lines.append(f"| {r['split']} | {r['method']} | {r['t_generality']:.3f} | {r['near_miss_locality']:.3f} | "
                     f"{coupled} | {ok} | `{r['file']}` |")
    (HERE / "frontier.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    ax.fill_between([BAR_T_GEN, 1.005], BAR_NEAR_MISS, 1.005, color="tab:green", alpha=0.15,
                    label="both bars met")
    _scatter(ax, found)
    ax.set_xlabel("T-Generality (unseen wordings of the edit)")
    ax.set_ylabel("near-miss locality (same image, neighbouring question)")
    ax.set_title("#20: every single-edit full-suite run on record")
    ax.set_xlim(0.0, 1.005)
    ax.set_ylim(0.25, 1.005)
    ax.legend(loc="lower left")
    inset = ax.inset_axes([0.42, 0.08, 0.45, 0.45])
    inset.fill_between([BAR_T_GEN, 1.0], BAR_NEAR_MISS, 1.0, color="tab:green", alpha=0.15)
    _scatter(inset, found, min_t_gen=0.85, label=False)
    inset.set_xlim(0.87, 1.0)
    inset.set_ylim(0.78, 1.0)
    inset.set_title("LDKE variants", fontsize=8)
    inset.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "frontier.png", dpi=120)


if __name__ == "__main__":
    main()
