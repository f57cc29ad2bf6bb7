"""The run's short report: a markdown page and PNG plots of the training curves.

    <run_dir>/report/report.md      what each stage did, in numbers, with the plots
    <run_dir>/report/training.png   loss, rewards (chosen vs rejected), delta, reward accuracy
"""

from __future__ import annotations

import io
import json
from pathlib import Path


def training_plot(card: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, ev = card["history"], [e for e in card["eval_history"] if e.get("eval/rows")]
    steps = [m["step"] for m in h]
    fig, ax = plt.subplots(2, 2, figsize=(10, 7))
    panels = [("loss", [("loss", "train")], "eval/loss"),
              ("rewards", [("rewards/chosen", "chosen (thumbs-up)"), ("rewards/rejected", "rejected (thumbs-down)")],
               None),
              ("reward shift delta", [("delta", "delta")], None),
              ("reward accuracy", [("reward_accuracy", "train")], "eval/reward_accuracy")]
    for a, (title, series, eval_key) in zip(ax.flat, panels, strict=True):
        for key, label in series:
            a.plot(steps, [m[key] for m in h], label=label)
        if eval_key and ev:
            a.plot([e["step"] for e in ev], [e[eval_key] for e in ev], "o--", label="eval")
        a.set_title(title)
        a.set_xlabel("step")
        a.legend(fontsize=8)
    fig.suptitle(f"{card['objective']['loss'].upper()} on {card['base_model']} ({card['steps']} steps)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def write_report(run_dir: Path, manifest: dict, card: dict | None) -> Path:
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    st = manifest["stages"]
    lines = ["# bco-ray run report", "", f"Run directory: `{run_dir}`", ""]
    if failed := manifest.get("failed"):
        lines += [f"**Failed in stage `{failed['stage']}`** after {failed['seconds']} s: `{failed['error']}`", "",
                  "The stages below ran before it (or in an earlier run); the full trace is in "
                  "`logs/bco-ray.log`.", ""]
    lines += ["| stage | seconds | skipped | summary |", "|---|---|---|---|"]
    for name, s in st.items():
        keep = {k: v for k, v in s.items() if k not in ("seconds", "skipped", "final_metrics", "final_eval", "usage")
                and not isinstance(v, dict | list)}
        lines.append(f"| {name} | {s.get('seconds', '')} | {'yes' if s.get('skipped') else ''} | "
                     f"{json.dumps(keep)[:300]} |")
    if "prepare" in st:
        p = st["prepare"]
        lines += ["", "## Data", "", f"{p['rows_read']} rows read, {p['kept']} kept, {p['quarantined']} quarantined "
                  f"({', '.join(f'{k}: {v}' for k, v in p['quarantine_reasons'].items()) or 'none'}), "
                  f"{p['deduplicated']} deduplicated."]
        udm = p.get("udm") or {}
        if udm.get("enabled"):
            lines += ["", f"UDM classifier: held-out AUC {udm.get('heldout_auc', float('nan')):.3f}; "
                      "diagnostics: `prepared/udm/diagnostics.png`.", "",
                      "![UDM diagnostics](../prepared/udm/diagnostics.png)"]
    if card:
        (out / "training.png").write_bytes(training_plot(card))
        fm, ev = card["final_metrics"], card["final_eval"]
        lines += ["", "## Training", "",
                  f"{card['objective']['loss']} (beta {card['objective']['beta']}), {card['steps']} steps; final train "
                  f"loss {fm.get('loss', float('nan')):.4f}, delta {fm.get('delta', 0):+.4f}; eval loss "
                  f"{ev.get('eval/loss', float('nan')):.4f}, eval reward accuracy "
                  f"{ev.get('eval/reward_accuracy', float('nan')):.3f}, eval margin "
                  f"{ev.get('eval/rewards/margin', float('nan')):+.4f}.", "",
                  f"Model: `{card['model']}` (run card beside it).", "", "![training](training.png)"]
    if "serve" in st:
        s = st["serve"]
        lines += ["", "## Served", "", f"`{s['url']}` answered:", "", f"> **Q:** {s['question']}", ">",
                  f"> **A:** {s['answer']}"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
