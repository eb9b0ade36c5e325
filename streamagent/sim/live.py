"""The demo's live view: day, rates, model version, profit against the shop's optimum."""
from __future__ import annotations

import time

import numpy as np


class LiveView:
    def __init__(self, args, ref: dict, kshop, days: list, dlq):
        self.args, self.ref, self.kshop, self.days, self.dlq = args, ref, kshop, days, dlq
        self.t_start = time.monotonic()

    def _week(self) -> float:
        return float(np.mean([r.expected_profit for r in self.days[-7:]])) if self.days else 0.0

    def line(self) -> str:
        """One plain line, for logs that are not a terminal."""
        d = self.days[-1]
        return (f"day {len(self.days)}: {self._week():.3f} per user per day (optimum "
                f"{self.ref['optimal']:.3f}), model v{max(d.policy_versions)}")

    def render(self, bad_sent: int):
        from streamagent.extras import require

        require("demo", "rich", what="the demo's live view")
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table

        el = max(1e-9, time.monotonic() - self.t_start)
        ks, ref, users = self.kshop, self.ref, self.args.users
        d = self.days[-1] if self.days else None
        last7 = self._week()
        top = Table.grid(padding=(0, 3))
        top.add_row(f"day [bold]{len(self.days)}[/]/{self.args.days}",
                    f"events [bold]{ks.events_sent:,}[/] ({ks.events_sent / el:,.0f}/s)",
                    f"decisions [bold]{ks.decisions_seen:,}[/] "
                    f"({ks.decisions_seen / el:,.0f}/s)",
                    f"model [bold]v{max(d.policy_versions) if d else 0}[/]",
                    f"DLQ [bold red]{self.dlq.total}[/] of {bad_sent} bad")
        t = Table(title="profit per user per day (expected, from the shop's true order "
                        "probabilities)", expand=True)
        for c in ("", "last day", "7-day mean", "of optimum"):
            t.add_column(c, justify="right")
        if d:
            t.add_row("streamagent", f"{d.expected_profit:.3f}", f"{last7:.3f}",
                      f"{last7 / ref['optimal']:.0%}")
        for k in ("optimal", "myopic_optimal", "never"):
            t.add_row(k.replace("_", " "), "", f"{ref[k]:.3f}", f"{ref[k] / ref['optimal']:.0%}")
        mix = ""
        if d:
            mix = (f"coupons {d.coupons / users:.0%} of sessions, explored "
                   f"{d.explored / users:.0%}, orders {d.orders}, "
                   f"{d.seconds:.1f} s per simulated day")
        return Panel(Group(top, t, mix), title="streamagent: the live loop")
