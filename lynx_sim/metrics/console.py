"""What a run shows on the terminal: a progress bar on long runs, and the summary table at the end."""

from __future__ import annotations

from contextlib import contextmanager


class Bar:
    """What a driver advances: a rich task, or nothing when the bar is off."""

    def __init__(self, progress, task):
        self.p, self.task = progress, task

    def update(self, n: int = 1) -> None:
        if self.p is not None:
            self.p.update(self.task, advance=n)


@contextmanager
def progress(quiet: bool, total: int, what: str):
    """A progress bar on long runs (rich; off when quiet or when the output is not a terminal)."""
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    if quiet or not console.is_terminal:
        yield Bar(None, None)
        return
    with Progress(console=console, transient=True) as p:
        yield Bar(p, p.add_task(what, total=total))


def print_table(s: dict, out_dir) -> None:
    """The summary on the console: the policy against vanilla, the speedup, the cost model."""
    from rich.console import Console
    from rich.table import Table

    serving = s["workload"] != "decode"
    what = f"{s['requests']} requests, {s['workload']} workload" if serving else f"{s['steps']} decode steps"
    t = Table(title=f"{s['policy']} vs vanilla: {s['model']} on {s['hardware']}, batch {s['batch']}, {what}, "
                    f"trace {s['trace']}")
    for col in ("metric", "vanilla", s["policy"], "policy / vanilla"):
        t.add_column(col, justify="right" if col != "metric" else "left")

    def row(name, v, p, fmt="{:.3f}"):
        ok = v is not None and p is not None
        t.add_row(name, "-" if v is None else fmt.format(v), "-" if p is None else fmt.format(p),
                  f"{p / v:.3f}" if ok and v else "")

    if serving:
        v = s.get("vanilla_run") or {}
        for name, key in (("TTFT p50 (ms)", "ttft_ms"), ("TPOT p50 (ms)", "tpot_ms"), ("TPOT p99 (ms)", "tpot_ms")):
            q = "p99" if "p99" in name else "p50"
            row(name, (v.get(key) or {}).get(q), s[key][q])
        row("output throughput (tok/s)", v.get("throughput_tok_s"), s["throughput_tok_s"], "{:.0f}")
        row(f"goodput, TPOT <= {s['slo']['tpot_ms']} ms (tok/s)", v.get("goodput_tok_s"), s["goodput_tok_s"], "{:.0f}")
        row("distinct experts per layer (decode steps)", v.get("distinct_experts_decode"), s["distinct_experts_decode"])
        t.add_row("policy acted on (fraction of iterations)", "", f"{s['policy_acted_fraction']:.3f}", "")
    else:
        for name, key in (("decode step time (ms)", "step_time_ms"), ("MoE time per step (ms)", "moe_time_ms"),
                          ("distinct experts per layer", "distinct_experts")):
            row(name, s[key]["vanilla"], s[key]["policy"])
        top1 = "n/a (trace has unordered ids only)" if s["top1_retention"] is None else f"{s['top1_retention']:.3f}"
        t.add_row("top-1 expert retained", "1.000", top1, "")
        t.add_row("gate mass retained", "1.000", f"{s['gate_mass_retained']:.3f}", "")
    console = Console()
    console.print(t)
    if serving:
        console.print(f"TPOT speedup (vanilla / {s['policy']}): [bold]{s.get('tpot_speedup') or float('nan'):.3f}x[/bold]"
                      f"   MoE share {s['moe_share']:.2f}   bandwidth utilisation {s['bandwidth_utilisation']:.2f}"
                      f"   preemptions {s['preemptions']}   exact: {s['exact']}")
    else:
        console.print(f"speedup (vanilla step time / {s['policy']} step time): [bold]{s['speedup']:.3f}x[/bold]"
                      f"   exact: {s['exact']}")
    cal = s.get("calibration")
    if cal:
        moe = (cal["heldout_error"].get("moe_decode") or {}).get("median")
        console.print(f"cost model: calibration {cal['name']} ({cal['source']}, {cal['date']}"
                      + (f"; MoE decode held-out median error {moe:.1%}" if moe is not None else "") + ")")
    else:
        console.print(f"cost model: uncalibrated roofline on {s['hardware']} (assumed factors: see summary 'assumptions')")
    if out_dir is not None:
        console.print(f"outputs: {out_dir}/summary.json, steps.csv{', requests.csv' if serving else ''}, trace.json, plots/")
