"""The demo's report (markdown + learning-curve PNG), and the moving mean every curve uses."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np


def moving_mean(x, window: int = 7) -> np.ndarray:
    """Trailing mean over ``window`` days (fewer at the start: the whole series if shorter)."""
    d = np.asarray(x, dtype=float)
    w = max(1, min(window, len(d)))
    return np.convolve(d, np.ones(w) / w, mode="valid")


def write_report(out: Path, args, days, ref: dict, dlq_reasons: Counter, bad_sent: int,
                 seconds: float, waited_for_learner_s: float = 0.0) -> str:
    out.mkdir(parents=True, exist_ok=True)
    prof = np.array([d.expected_profit for d in days])
    k = max(1, len(prof) // 4)
    tail = float(prof[-k:].mean())
    versions = max(max(d.policy_versions) for d in days)
    lines = [
        f"# streamagent demo: {args.users} users, {len(days)} simulated days, scenario "
        f"`{args.scenario}`",
        "",
        f"Wall clock {seconds:.0f} s; {sum(d.events for d in days):,} user events, "
        f"{len(days) * args.users:,} decisions, {sum(d.orders for d in days):,} orders; "
        f"the learner published {versions} model versions, hot-swapped by the worker; the shop "
        f"waited {waited_for_learner_s:.0f} s in all for the learner to keep up (a simulated "
        f"day lasts about a second here, not a day).",
        "",
        "| policy | profit / user / day | of optimum |",
        "|---|---:|---:|",
        f"| streamagent, last {k} days | {tail:.3f} | {tail / ref['optimal']:.1%} |",
        f"| streamagent, first {k} days | {prof[:k].mean():.3f} | "
        f"{prof[:k].mean() / ref['optimal']:.1%} |",
    ]
    for name in ("optimal", "myopic_optimal", "never"):
        lines.append(f"| {name.replace('_', ' ')} (MDP, exact) | {ref[name]:.3f} | "
                     f"{ref[name] / ref['optimal']:.1%} |")
    lines += [
        "",
        f"Coupons in {sum(d.coupons for d in days) / (len(days) * args.users):.1%} of sessions; "
        f"discount given {sum(d.discount for d in days) / (len(days) * args.users):.3f} "
        f"per user per day.",
        f"Dead-lettered {sum(dlq_reasons.values())} of {bad_sent} broken messages: "
        + ", ".join(f"{r} {n}" for r, n in sorted(dlq_reasons.items())) + ".",
        "",
        "Profit is the expected profit of each (user state, coupon) under the shop's true order "
        "probabilities, which ranks policies like sampled profit with far less noise. A short "
        "demo shows the loop working and learning; `streamagent bench learning` measures how "
        "close the learner gets (docs/BENCHMARKS.md).",
        "",
        "![learning curve](learning-curve.png)",
    ]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    plot_curve(out / "learning-curve.png", prof, days, ref, args)
    return text


def plot_curve(path: Path, prof: np.ndarray, days, ref: dict, args) -> None:
    from streamagent.extras import require

    require("demo", "matplotlib", what="the demo's learning curve")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = np.arange(1, len(prof) + 1)
    ax.plot(x, prof, color="tab:blue", alpha=0.3, label="streamagent, daily")
    w = min(7, len(prof))
    sm = moving_mean(prof, w)
    ax.plot(np.arange(w, len(prof) + 1), sm, color="tab:blue", label=f"streamagent, {w}-day mean")
    styles = {"optimal": ("black", "--"), "myopic_optimal": ("tab:orange", ":"),
              "never": ("tab:gray", "-.")}
    for k, (c, ls) in styles.items():
        ax.axhline(ref[k], color=c, ls=ls, label=f"{k.replace('_', ' ')} (MDP)")
    ax2 = ax.twinx()
    ax2.step(x, [max(d.policy_versions) for d in days], color="tab:green", alpha=0.4,
             where="post")
    ax2.set_ylabel("model version", color="tab:green")
    ax.set_xlabel("simulated day")
    ax.set_ylabel("profit / user / day")
    ax.set_title(f"demo: {args.users} users, scenario {args.scenario}, through Kafka")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
