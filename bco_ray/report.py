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


def generation_check_section(card: dict) -> list[str]:
    """The eval curve: at each eval, the held-out loss and the policy's greedy answers against
    step 0 (looping, cut at max tokens, empty), and which weights were exported."""
    evs = [e for e in card["eval_history"] if "gen/passed" in e]
    if not evs:
        return []
    e0 = evs[0]
    lines = ["", "### Generation check during training", "",
             f"At each eval the policy answers {e0['gen/prompts']} eval-split prompts greedily; against its own "
             f"answers at step 0 (looping {e0['gen/degenerate_start']:.0%}, cut {e0['gen/at_max_tokens_start']:.0%}, "
             f"empty {e0['gen/empty_start']:.0%}) the eval gate's limits apply.", "",
             "| step | eval loss | reward accuracy | looping | cut at max tokens | empty | distinct-2 | check |",
             "|---|---|---|---|---|---|---|---|"]
    for e in evs:
        lines.append(f"| {e['step']} | {e.get('eval/loss', float('nan')):.4f} | "
                     f"{e.get('eval/reward_accuracy', float('nan')):.3f} | {e['gen/degenerate']:.0%} | "
                     f"{e['gen/at_max_tokens']:.0%} | {e['gen/empty']:.0%} | {e['gen/distinct_2']:.2f} | "
                     + ("passed" if e["gen/passed"] else "**failed**: " + "; ".join(e["gen/reasons"])) + " |")
    if stop := card.get("stopped_early"):
        lines += ["", f"Training **stopped early** at step {stop['step']} (train.early_stop_patience)."]
    return lines


def _pct(r: dict) -> str:
    return f"{r['rate']:.0%} [{r['ci95'][0]:.0%}, {r['ci95'][1]:.0%}]"


def _quote(text: str, limit: int = 300) -> str:
    t = " ".join(str(text).split())
    t = t if len(t) <= limit else t[:limit] + " …"
    return (t or "(empty)").replace("|", "\\|")


def eval_section(e: dict) -> list[str]:
    """The eval stage: verdict, candidate vs reference with 95 % intervals, answers side by side."""
    m = e["metrics"]
    verdict = "**passed**" if e["passed"] else ("**REJECTED**" + ("" if e["enforced"] else " (not enforced)")
                                                + ": " + "; ".join(e["reasons"]))
    lines = ["", "## Evaluation", "", f"Gate: {verdict}. {m['prompts']} prompts from {e['prompts_from']}; "
             "candidate = the trained model, reference = the model it started from, same prompts and sampling "
             "seeds. Rates with 95 % Wilson intervals; every answer is in `eval/samples.jsonl`.", "",
             "| measure | mode | candidate | reference |", "|---|---|---|---|"]
    for mode in ("greedy", "sampled"):
        if g := m.get(mode):
            for key, what in (("degenerate", "looping answers"), ("at_max_tokens", "cut at max_tokens"),
                              ("empty", "empty answers")):
                lines.append(f"| {what} | {mode} | {_pct(g[key]['candidate'])} | {_pct(g[key]['reference'])} |")
            lines.append(f"| mean length (tokens) | {mode} | {g['tokens']['candidate']:.1f} | "
                         f"{g['tokens']['reference']:.1f} |")
            lines.append(f"| distinct-2 | {mode} | {g['distinct_2']['candidate']:.3f} | "
                         f"{g['distinct_2']['reference']:.3f} |")
    if kl := m.get("kl"):
        lines.append(f"| KL to reference (nats/token) | sampled | {kl['per_token']:.4f} "
                     f"[{kl['per_token_ci95'][0]:.4f}, {kl['per_token_ci95'][1]:.4f}] | 0 |")
    if j := m.get("judge"):
        info = j["info"]
        for mode in ("greedy", "sampled"):
            if s := j.get(mode):
                lines.append(f"| judge score ({info['kind']}) | {mode} | {s['candidate']:.3f} | {s['reference']:.3f} |")
                lines.append(f"| judge: candidate wins | {mode} | {s['win_rate']:.0%} "
                             f"[{s['win_rate_ci95'][0]:.0%}, {s['win_rate_ci95'][1]:.0%}] | |")
        if info.get("heldout_auc") is not None:
            note = " (below 0.6 it can barely tell good from bad: read its scores as weak)" \
                if info["heldout_auc"] < 0.6 else ""
            lines += ["", f"The feedback judge (a classifier on embeddings of thumbs-up vs thumbs-down completions) "
                          f"has held-out AUC {info['heldout_auc']:.3f}{note}."]
    lines += ["", "Greedy answers, side by side:", "", "| prompt | reference | candidate |", "|---|---|---|"]
    lines += [f"| {_quote(r['prompt'], 160)} | {_quote(r['reference'])} | {_quote(r['candidate'])} |"
              for r in e["side_by_side"]]
    return lines


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
            lines += ["", f"UDM classifier: held-out AUC {udm.get('heldout_auc', float('nan')):.3f}; weights "
                      f"{udm.get('decision', 'on')}; diagnostics: `prepared/udm/diagnostics.png`.", "",
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
                  f"Model: `{card['model']}` (run card beside it), the weights of step {card.get('exported_step')}.",
                  "", "![training](training.png)"]
        lines += generation_check_section(card)
    if (e := st.get("eval")) and "metrics" in e:
        lines += eval_section(e)
    elif e and e.get("disabled"):
        lines += ["", "## Evaluation", "", "Off (`eval.enabled: false`): the model was not checked before serving."]
    if "serve" in st and "skipped_because" in st["serve"]:
        lines += ["", "## Served", "", f"Not started: {st['serve']['skipped_because']}."]
    elif "serve" in st:
        s = st["serve"]
        lines += ["", "## Served", "", f"`{s['url']}` answered:", "", f"> **Q:** {s['question']}", ">",
                  f"> **A:** {s['answer']}"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
