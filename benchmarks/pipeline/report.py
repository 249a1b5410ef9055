"""The result as text (printed at the end of a run) and as a three-panel plot (pipeline.png)."""
from __future__ import annotations

from pathlib import Path

from benchmarks.pipeline.options import METHODS


def summary_a(A: dict) -> list[str]:
    out = ["A. partition balance (bottleneck / lower bound; predicted | measured) and bottleneck ratios vs time",
           f"{'model':>12} {'P':>2} | {'time':>11} {'params':>11} {'uniform':>11} | "
           f"{'params/time':>11} {'uniform/time':>12} | time-plan stages"]
    for model, r in A.items():
        for P, e in r["P"].items():
            m, q = e["methods"], e["ratios"]
            cells = " ".join(f"{m[k]['predicted_balance']:5.2f}/{m[k]['measured_balance']:<5.2f}" for k in METHODS)
            out.append(f"{model:>12} {P:>2} | {cells} | {q['predicted_params_vs_time']:5.2f}/"
                       f"{q['measured_params_vs_time']:<5.2f} {q['predicted_uniform_vs_time']:6.2f}/"
                       f"{q['measured_uniform_vs_time']:<5.2f} | {' | '.join(m['time']['stage_blocks'])}")
    return out


def summary_b(B: dict) -> list[str]:
    alone = [round(x) for x in B["stage_ms_alone"]]
    concurrent = [round(x) for x in B["stage_ms_concurrent"]]
    out = [f"B. {B['model']} {B['image_size']}px x{B['micro_batch']}, P={B['P']} (plan "
           f"{' | '.join(B['plan']['stage_blocks'])}; stage ms alone {alone}, concurrent {concurrent})",
           f"{'schedule':>8} {'M':>2} {'steps/s':>14} {'seq s':>7} {'pipe s':>7} {'speedup':>13} "
           f"{'eff':>6} {'ideal':>6} {'sim':>6} {'eff/ideal':>9} {'eff/sim':>8} {'contended sim':>13}"]
    for r in B["rows"]:
        out.append(f"{r['schedule']:>8} {r['M']:>2} {r['steps_per_s']:7.3f}+-{r['steps_per_s_ci95']:5.3f} "
                   f"{r['sequential_step_s']:7.2f} {r['pipelined_step_s']:7.2f} "
                   f"{r['speedup']:6.2f}+-{r['speedup_ci95']:4.2f} {r['efficiency']:6.3f} "
                   f"{r['ideal_efficiency']:6.3f} {r['simulated_ideal_efficiency']:6.3f} "
                   f"{r['efficiency_vs_ideal']:9.3f} {r['efficiency_vs_simulated_ideal']:8.3f} "
                   f"{r['contended_simulated_ideal_efficiency']:13.3f}")
    return out


def summary_c(C: dict) -> list[str]:
    out = ["C. stage gradient average, P=2 x D=2 (algbw GB/s, mean over stages and repeats)"]
    for r in C.get("rows", []):
        ratio = None
        if r["engine"] == "horovod":
            same = [q["horovod_vs_mpi"] for q in C["ratios"] if (q["pass"], q["point"]) == (r["pass"], r["point"])]
            ratio = same[0] if same else None
        mb = "/".join(f"{b / 2**20:.1f}" for b in r["bytes_per_stage"])
        out.append(f"{r['variant']:>24} {r['point']:>16} ({mb} MiB) {r['algbw_GBps']:7.3f} +/- {r['algbw_ci95']:.3f}"
                   + (f"   horovod/mpi {ratio:.2f}" if ratio else ""))
    for k, v in C.get("horovod_errors", {}).items():
        out.append(f"   horovod error ({k}): {v[:300]}")
    return out


def summary(result: dict) -> str:
    out = []
    A = result.get("partition", {})
    if A:
        out += summary_a(A)
    B = result.get("pipeline", {})
    if B.get("rows"):
        out += summary_b(B)
    elif "error" in B:
        out.append(f"B. failed: {B['error'].splitlines()[-1] if B['error'] else ''}")
    C = result.get("reducers", {})
    if C.get("rows") or C.get("horovod_errors"):
        out += summary_c(C)
    return "\n".join(out)


def legend_if_any(ax, fontsize: int) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=fontsize)


def plot_balance(ax, A: dict) -> None:
    """Bars: predicted balance per method; crosses: measured."""
    labels, x = [], 0
    colors = {"time": "C0", "params": "C1", "uniform": "C2"}
    for model, r in A.items():
        for P, e in r["P"].items():
            for i, m in enumerate(METHODS):
                v = e["methods"][m]
                ax.bar(x + (i - 1) * 0.27, v["predicted_balance"], 0.27, color=colors[m],
                       label=m if not labels else None)
                ax.plot(x + (i - 1) * 0.27, v["measured_balance"], "kx")
            labels.append(f"{model}\nP={P}")
            x += 1
    ax.plot([], [], "kx", label="measured")
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("bottleneck / lower bound")
    ax.set_title("A. partition balance (bars: predicted)")
    legend_if_any(ax, 8)


def plot_pipeline(ax, B: dict) -> None:
    """Efficiency per schedule against M, beside the simulated ideals and M/(M+P-1) x mean/max."""
    for i, sch in enumerate(dict.fromkeys(r["schedule"] for r in B.get("rows", []))):
        rows = [r for r in B["rows"] if r["schedule"] == sch]
        Ms = [r["M"] for r in rows]
        ax.errorbar(Ms, [r["efficiency"] for r in rows], yerr=[r["efficiency_ci95"] for r in rows],
                    marker="o", capsize=3, label=f"{sch} measured", color=f"C{i}")
        ax.plot(Ms, [r["simulated_ideal_efficiency"] for r in rows], ":", color=f"C{i}",
                label=f"{sch} simulated ideal")
        ax.plot(Ms, [r["contended_simulated_ideal_efficiency"] for r in rows], "-.",
                color=f"C{i}", alpha=0.6, label=f"{sch} simulated ideal, concurrent stage times")
    if B.get("rows"):
        rows = [r for r in B["rows"] if r["schedule"] == B["rows"][0]["schedule"]]
        ax.plot([r["M"] for r in rows], [r["ideal_efficiency"] for r in rows], "k--", label="M/(M+P-1) x mean/max")
        ax.set_title(f"B. {B['model']} {B['image_size']}px x{B['micro_batch']}, P={B['P']}: efficiency")
        ax.set_xticks(sorted({r["M"] for r in B["rows"]}))
    ax.set_xlabel("micro-batches M")
    ax.set_ylabel("speedup / P")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    legend_if_any(ax, 7)


def plot_reducers(ax, C: dict) -> None:
    """algbw per engine and pass against the bytes per stage buffer."""
    for variant in dict.fromkeys(r["variant"] + "|" + r["pass"] for r in C.get("rows", [])):
        v, p = variant.split("|")
        rows = [r for r in C["rows"] if r["variant"] == v and r["pass"] == p]
        xs = [max(r["bytes_per_stage"]) for r in rows]
        ax.errorbar(xs, [r["algbw_GBps"] for r in rows], yerr=[r["algbw_ci95"] for r in rows], marker="o", capsize=3,
                    label=f"{v} ({p})" if v == "mpi" else v, linestyle="-" if v == "mpi" else "--")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("bytes per stage buffer (largest stage)")
    ax.set_ylabel("algbw (GB/s)")
    ax.set_title("C. stage gradient average, P=2 x D=2")
    ax.grid(True, which="both", alpha=0.3)
    legend_if_any(ax, 7)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    plot_balance(axes[0], result.get("partition", {}))
    plot_pipeline(axes[1], result.get("pipeline", {}))
    plot_reducers(axes[2], result.get("reducers", {}))
    fig.suptitle(f"pipeline benchmark, {result['machine']['cpu_model'][:50]}, {result['machine']['cores']} cores",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
