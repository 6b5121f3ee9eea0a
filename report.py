"""
From prediction records to the paper's numbers, tables and figures: evaluate.py scores each question, this file
aggregates the scores into a run's summary (results.json), results.md and by_actions.png, and Table 1 of a run.sh run
from OUT/eval/LABEL/{results.json,predictions.jsonl} per row: the cells world_table's note defines, under them the
additions README's "The main job" lists (bootstrap intervals; on a test split this small, a few EM points can be noise).

Usage (no model, no torch; run.sh's last step):
  python report.py --run out/tiny --rows model-only workflow sft-1 sft-2 sft-12 sft-123 sft-12+rl-real \\
      sft-123+rl-sim sft-123+rl-sim-real --stage-seconds 3600 --wall-seconds 2700
writes OUT/results.md, OUT/results.json (rows, intervals, paired, fig3) and OUT/results_fig3.png (with matplotlib).
  python report.py --run out/tiny --seeds    # RL rows over seeds (run.sh --rl-seed N) -> OUT/rl_seeds.{md,json}
  python report.py --run out/tiny --curve    # EM vs the share of real RL steps (run.sh --curve) -> OUT/curve.*
In-process (evaluate.py):  summary = summarize(predictions); write_outputs(out_dir, summary, predictions, label)
"""
import argparse
import json
import os
from collections import Counter, defaultdict

import numpy as np

from tools import read_jsonl, write_atomic

# -----------------------------------------------------------------------------
# A run's numbers (results.json)

ACTION_BUCKETS = ("0", "1", "2", "3", "4", "5+")  # one run's results.json / results.md
FIG3_BUCKETS = ("0", "1", "2", "3", "4+")  # paper Figure 3 in the run.sh table (few questions take 5+ actions)
# evaluate.py's modes whose actions never run (its ENV_OF_MODE "none"; a test pins the two): no Figure 3 row
NO_ACTION_MODES = ("no-action", "workflow")


def success_by_actions(predictions, buckets=FIG3_BUCKETS):
    """Figure 3: per sample, the share answered right (EM) among those with 0, 1, ... actions (last bucket: more)."""
    b = {k: {"n": 0, "correct": 0} for k in buckets}
    for s in (s for r in predictions for s in r.get("samples", [r])):
        k = buckets[min(s["num_actions"], len(buckets) - 1)]
        b[k]["n"] += 1
        b[k]["correct"] += s["em"]
    return {k: {**v, "success_rate": v["correct"] / v["n"] if v["n"] else None} for k, v in b.items()}


def _metrics(records, with_judge):
    """Mean metrics over prediction records (each already averaged over its samples)."""
    keys = ["em", "f1", "cover_em", "mention", "format_ok", "answered", "num_actions"]
    keys += ["judge"] if with_judge else []
    return {"n": len(records), **{k: sum(r[k] for r in records) / max(len(records), 1) for k in keys}}


def summarize(predictions, with_judge=False):
    """results.json's numbers: overall, per dataset and type, their mean (the paper's Avg), Figure 3, stop reasons."""
    summary = {"overall": _metrics(predictions, with_judge)}
    for field in ("dataset", "type"):
        groups = defaultdict(list)
        for r in predictions:
            if field in r:
                groups[str(r[field])].append(r)
        if groups:
            summary[f"by_{field}"] = {g: _metrics(rs, with_judge) for g, rs in groups.items()}
    per_group = summary.get("by_dataset") or summary.get("by_type") or {"all": summary["overall"]}
    summary["average"] = {k: sum(m[k] for m in per_group.values()) / len(per_group)
                          for k in summary["overall"] if k != "n"}
    samples = [s for r in predictions for s in r.get("samples", [r])]
    summary["by_actions"] = success_by_actions(predictions, ACTION_BUCKETS)
    summary["stop_reasons"] = dict(Counter(s["stop_reason"] for s in samples))
    summary["format_checks"] = dict(Counter(s["format"] for s in samples))
    return summary


# -----------------------------------------------------------------------------
# A run's results.md and plot

def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def _md_table(head, rows):
    line = lambda cells: "| " + " | ".join(map(str, cells)) + " |"  # noqa: E731
    return [line(head), "|" + "---|" * len(head)] + [line(r) for r in rows]


def format_table(rows, metric="em"):
    """Table-1-like markdown of rows [(label, summary)]: `metric` % (" / judge" if any) per dataset (or type), Avg."""
    per = [s.get("by_dataset") or s.get("by_type") or {} for _, s in rows]
    groups = list(dict.fromkeys(g for p in per for g in p))  # in order of first appearance

    def cell(m):
        return "-" if m is None else _pct(m[metric]) + (f" / {_pct(m['judge'])}" if "judge" in m else "")

    body = [[label] + [cell(p.get(g)) for g in groups] + [cell(s["average"])] for (label, s), p in zip(rows, per)]
    return "\n".join(_md_table(["run"] + groups + ["Avg"], body))


def format_results_md(summary, label):
    """results.md: the Table-1 row, the full metric table per group, success by #actions (Figure 3), tool calls."""
    judge = "judge" in summary["overall"]
    cols = ["em", "f1", "cover_em"] + (["judge"] if judge else []) + ["format_ok", "answered", "mention"]
    out = [f"# {label}: {summary['mode']}, {summary['n_questions']} questions x {summary['n_samples']} samples", "",
           f"EM{' / LLM judge' if judge else ''} (%), Avg = mean over groups:", "",
           format_table([(label, summary)]), ""]
    groups = {**summary.get("by_dataset", {}), **summary.get("by_type", {}), "overall (micro)": summary["overall"],
              "Avg (macro)": {"n": summary["n_questions"], **summary["average"]}}
    body = [[g, m["n"]] + [_pct(m[c]) for c in cols] + [f"{m['num_actions']:.2f}"] for g, m in groups.items()]
    out += _md_table(["group", "n"] + cols + ["actions/question"], body)
    by_actions = [summary["by_actions"][b] for b in ACTION_BUCKETS]
    out += ["", "Success rate by number of actions (paper Figure 3, per sample):", ""]
    out += _md_table(["#actions", *ACTION_BUCKETS], [["n"] + [b["n"] for b in by_actions],
                                                     ["EM (%)"] + [_pct(b["success_rate"]) for b in by_actions]])
    out += ["", "Tool calls: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in summary["tool_calls"].items()),
            "Stop reasons: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["stop_reasons"].items())),
            "Format checks: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["format_checks"].items())), ""]
    return "\n".join(out)


def _plot(path, draw, figsize, ncols=1, **savefig):
    """draw(fig, axes) on a 1 x ncols figure, saved atomically as a PNG if matplotlib is installed -> whether saved."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, ncols, figsize=figsize)
    draw(fig, axes)
    fig.savefig(path + ".tmp.png", **savefig)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return True


def write_outputs(out_dir, summary, predictions, label="run"):
    """results.json, results.md, predictions.jsonl, by_actions.png (the run's Figure 3), each written atomically."""
    def draw(fig, axes):
        (ax1, ax2), b = axes, summary["by_actions"]
        ax1.bar(ACTION_BUCKETS, [b[k]["correct"] for k in ACTION_BUCKETS])
        ax1.set(xlabel="#actions", ylabel="correct answers", title="(a) correct by #actions")
        ax2.bar(ACTION_BUCKETS, [100 * (b[k]["success_rate"] or 0) for k in ACTION_BUCKETS])
        ax2.set(xlabel="#actions", ylabel="EM (%)", title="(b) success rate by #actions")
        fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    write_atomic(os.path.join(out_dir, "predictions.jsonl"),
                 "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
    write_atomic(os.path.join(out_dir, "results.md"), format_results_md(summary, label))
    _plot(os.path.join(out_dir, "by_actions.png"), draw, (9, 3.5), ncols=2)
    write_atomic(os.path.join(out_dir, "results.json"), json.dumps(summary, indent=2, ensure_ascii=False) + "\n")


# -----------------------------------------------------------------------------
# Table 1 on the embedded world: one row per evaluated checkpoint (run.sh's last step)

WORLD_COLUMNS = ["1hop", "2hop", "3hop", "4hop", "comparison", "arithmetic"]
AVG_OF = WORLD_COLUMNS + ["known"]  # avg = mean of these cells (macro, like the paper's Avg over datasets)
# Each RL row of run.sh and the row of the checkpoint its RL started from (run_args.json "init" of the RL checkpoint)
RL_START = {"sft-12+rl-real": "sft-12", "sft-123+rl-real": "sft-123", "sft-123+rl-sim": "sft-123",
            "sft-123+rl-sim-real": "sft-123"}
# run.sh --control: sim->real's schedule with every tool real (at the switch, at the end), for the seeds that have it
CONTROL = {"sft-123+rl-sim-ctl": "sft-123+rl-sim", "sft-123+rl-sim-real-ctl": "sft-123+rl-sim-real"}


def world_cells(predictions):
    """The per-question scores behind each Table 1 cell (see world_row): cell -> {(dataset, id): score}."""
    def scores(rows):
        return {(r.get("dataset"), r["id"]): float(r["em"]) for r in rows}
    unknown = [r for r in predictions if not r.get("known")]
    known = [r for r in predictions if r.get("known")]
    return {**{t: scores([r for r in unknown if r.get("type") == t]) for t in WORLD_COLUMNS}, "known": scores(known),
            "unknown_multihop": scores([r for r in unknown if r.get("type") in ("2hop", "3hop", "4hop")]),
            "known_no_action": scores([{**r, "em": r["num_actions"] == 0} for r in known])}  # 1 = answered w/o acting


def bootstrap_ci(groups, n_boot=1000, seed=0):
    """95% percentile bootstrap of mean-over-groups(mean of group), questions resampled within each group (cell_ci)."""
    rng = np.random.default_rng(seed)
    groups = [np.asarray(g, dtype=float) for g in groups if len(g)]
    if not groups:
        return None, None
    stats = np.mean([g[rng.integers(0, len(g), (n_boot, len(g)))].mean(1) for g in groups], axis=0)  # (n_boot,)
    return tuple(float(x) for x in np.percentile(stats, [2.5, 97.5]))


def cell_ci(cells, cell, base_cells=None):
    """A Table 1 cell -> {value, lo, hi, n}, bootstrap 95%; with base_cells: cell - base on questions both answered."""
    diffs = []
    for c in AVG_OF if cell == "avg" else [cell]:
        g, b = cells[c], base_cells[c] if base_cells else {}
        d = [g[k] - b.get(k, 0) for k in sorted(g.keys() & b.keys() if base_cells else g)]
        if d:  # a column without questions drops out
            diffs.append(d)
    return {"value": sum(sum(d) / len(d) for d in diffs) / len(diffs) if diffs else None,
            **dict(zip(("lo", "hi"), bootstrap_ci(diffs))), "n": sum(map(len, diffs))}


def world_row(predictions, model_dir):
    """A Table 1 row; rl_real_calls from the metrics.jsonl train_rl.py leaves in the checkpoint (0 without RL)."""
    mean = {c: sum(v.values()) / len(v) if v else None for c, v in world_cells(predictions).items()}
    present = [mean[c] for c in AVG_OF if mean[c] is not None]
    row = {**{c: mean[c] for c in AVG_OF}, "avg": sum(present) / len(present) if present else None,
           "unknown_multihop": mean["unknown_multihop"], "known_no_action": mean["known_no_action"]}
    metrics = os.path.join(model_dir, "metrics.jsonl")  # SFT checkpoints keep one too
    logs = [log for _, log in read_jsonl(metrics)] if os.path.exists(metrics) else []
    row["rl_real_calls"] = logs[-1].get("real_calls_total", 0) if logs else 0
    return row


def _ci(cell, signed=False):
    """A cell_ci result as "28.4 [22.1, 35.0]" (signed: "+1.2 [...]", EM points); "-" for a cell without questions."""
    if cell["value"] is None:
        return "-"
    v = f"{100 * cell['value']:+.1f}" if signed else _pct(cell["value"])
    return f"{v} [{_pct(cell['lo'])}, {_pct(cell['hi'])}]"


def read_eval(eval_dir):
    """An evaluate.py output dir -> (its args, its prediction records). A relative args["model"] is relative to where
    evaluate.py ran (run.sh: the repo root): found from here, else from the nearest folder above eval_dir holding it."""
    with open(os.path.join(eval_dir, "results.json")) as f:
        args = json.load(f)["args"]
    model, up = args.get("model"), os.path.abspath(eval_dir)
    if model and not os.path.isabs(model) and not os.path.exists(model):
        while up != os.path.dirname(up):
            up = os.path.dirname(up)
            if os.path.exists(os.path.join(up, model)):
                args = {**args, "model": os.path.join(up, model)}
                break
    return args, [p for _, p in read_jsonl(os.path.join(eval_dir, "predictions.jsonl"))]


def world_table(run_dir, labels, stage_seconds=None, wall_seconds=None):
    """Table 1 of run_dir/eval/LABEL per label -> (markdown, rows, extras); see the module docstring."""
    rows, cells, fig3 = {}, {}, {}
    for label in labels:
        args, predictions = read_eval(os.path.join(run_dir, "eval", label))
        rows[label], cells[label] = world_row(predictions, args["model"]), world_cells(predictions)
        if args.get("mode") not in NO_ACTION_MODES:
            fig3[label] = success_by_actions(predictions)
    cols = WORLD_COLUMNS + ["known", "avg", "unknown_multihop", "known_no_action"]
    lines = _md_table(["row"] + cols + ["RL real calls"],
                      [[label] + [_pct(r[c]) for c in cols] + [r["rl_real_calls"]] for label, r in rows.items()])
    note = ("\nEM (%) on the test split. Type columns: unknown-entity questions (answerable only by acting); known: "
            "questions on facts the base model was taught; known_no_action: share of known questions answered without "
            "acting; RL real calls: real tool calls spent by RL to make the checkpoint.")
    if wall_seconds is not None:
        note += f" Wall time of the run: {wall_seconds / 60:.1f} min."
    if stage_seconds is not None:
        note += f" The stages' own times (times.tsv; two at once in run.sh's lanes): {stage_seconds / 60:.1f} min."

    intervals = {label: {c: cell_ci(cells[label], c) for c in cols} for label in labels}
    paired = {label: {"start": start,
                      **{c: cell_ci(cells[label], c, cells[start]) for c in ("avg", "unknown_multihop")}}
              for label, start in RL_START.items() if label in cells and start in cells}
    md = ["", "## 95% bootstrap intervals (percentile, 1000 resamples of each cell's questions, seed 0)", ""]
    md += _md_table(["row"] + cols, [[label] + [_ci(iv[c]) for c in cols] for label, iv in intervals.items()])
    md += ["", "## RL row minus its starting checkpoint, same questions (paired bootstrap 95%, EM points)", ""]
    md += _md_table(["RL row", "start", "n (avg / multihop)", "avg", "unknown_multihop"],
                    [[label, p["start"], f"{p['avg']['n']} / {p['unknown_multihop']['n']}", _ci(p["avg"], True),
                      _ci(p["unknown_multihop"], True)] for label, p in paired.items()])
    md += ["", "## Figure 3: success rate (EM %, per sample) by number of actions, agent rows (n in brackets)", ""]
    md += _md_table(["row", *FIG3_BUCKETS], [[label] + [f"{_pct(b[k]['success_rate'])} ({b[k]['n']})"
                                                        for k in FIG3_BUCKETS] for label, b in fig3.items()])
    return "\n".join(lines + [note] + md) + "\n", rows, {"intervals": intervals, "paired": paired, "fig3": fig3}


# -----------------------------------------------------------------------------
# RL over seeds (run.sh --rl-seed N) and the real-fraction curve (run.sh --curve)

def rl_rows(run_dir, entries):
    """{label: (eval dir, START)} -> {label: the checkpoint, avg and unknown-multihop EM, paired gain over eval/START,
    real calls}."""
    out, starts = {}, {}
    for label, (eval_dir, start) in entries.items():
        args, predictions = read_eval(eval_dir)
        if start not in starts:  # one start row serves many RL rows (seeds, curve points): read it once
            starts[start] = world_cells(read_eval(os.path.join(run_dir, "eval", start))[1])
        cells, base = world_cells(predictions), starts[start]
        out[label] = {"start": start, "model": args["model"],
                      "real_calls": world_row(predictions, args["model"])["rl_real_calls"],
                      **{c: cell_ci(cells, c) for c in ("avg", "unknown_multihop")},
                      **{f"{c}_gain": cell_ci(cells, c, base) for c in ("avg", "unknown_multihop")}}
    return out


def seeds_report(run_dir):
    """The RL rows of seed 0 (the main run) and every OUT/seedN: per seed, then mean and sd of avg, gain, real calls."""
    def done(root, labels=RL_START):  # every row evaluated (a seed still running, or never run, is left out)
        return all(os.path.exists(os.path.join(root, "eval", label, "results.json")) for label in labels)
    seeds = [0] + sorted(int(d[4:]) for d in os.listdir(run_dir)
                         if d.startswith("seed") and d[4:].isdigit() and done(os.path.join(run_dir, d)))
    root = {s: run_dir if s == 0 else f"{run_dir}/seed{s}" for s in seeds}
    labels = {**RL_START, **{c: RL_START[row] for c, row in CONTROL.items()  # when every seed has the control's rows
                             if all(done(root[s], [c]) for s in seeds)}}
    per_seed = {s: rl_rows(run_dir, {label: (os.path.join(root[s], "eval", label), start)
                                     for label, start in labels.items()}) for s in seeds}
    md = [f"## RL rows over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}): EM %, paired gain over the start "
          "(95% bootstrap)", "", "| RL row | seed | avg | gain avg | unknown_multihop | gain multihop | real calls |",
          "|---|---|---|---|---|---|---|"]
    summary = {}
    for label in labels:
        for s in seeds:
            x = per_seed[s][label]
            md.append(f"| {label} | {s} | {_ci(x['avg'])} | {_ci(x['avg_gain'], True)} | "
                      f"{_ci(x['unknown_multihop'])} | {_ci(x['unknown_multihop_gain'], True)} | {x['real_calls']} |")
        stats = {k: [100 * per_seed[s][label][k]["value"] for s in seeds] for k in ("avg", "avg_gain")}
        stats["real_calls"] = [per_seed[s][label]["real_calls"] for s in seeds]
        summary[label] = {k: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else None,
                              "values": v} for k, v in stats.items()}
        md.append(f"| **{label}** | mean (sd) | {_spread(summary[label]['avg'])} | "
                  f"{_spread(summary[label]['avg_gain'], True)} | | | {_spread(summary[label]['real_calls'])} |")
    for control, row in CONTROL.items():  # what the simulated steps stand in for: seed means of gain and real calls
        if control in summary:
            g, c = (summary[row][k]["mean"] for k in ("avg_gain", "real_calls"))
            g0, c0 = (summary[control][k]["mean"] for k in ("avg_gain", "real_calls"))
            share = f"{100 * g / g0:.0f}%" if g0 else "n/a"
            md.append(f"\n{row} vs its all-real control {control}: {share} of the gain ({g:+.1f} vs {g0:+.1f}) "
                      f"with {100 * c / max(c0, 1):.1f}% of the real calls ({c:.0f} vs {c0:.0f})")
    return "\n".join(md) + "\n", {"seeds": seeds, "per_seed": per_seed, "summary": summary}


def _spread(s, signed=False):
    m = f"{s['mean']:+.1f}" if signed else f"{s['mean']:.1f}"
    return m if s["std"] is None else f"{m} ({s['std']:.1f})"


# k/6 of the steps real -> its row; k = 6 is the main run's all-real row from SFT-1&2&3
CURVE = {0: "real-0-of-6", 1: "real-1-of-6", 2: "real-2-of-6", 3: "real-3-of-6", 6: "sft-123+rl-real"}


def step_rewards(model_dir):
    """train_rl.py's metrics.jsonl in its checkpoint -> [(env, mean reward)] per step."""
    return [(row["env"], row["reward"]) for _, row in read_jsonl(os.path.join(model_dir, "metrics.jsonl"))]


def _sim_vs_real(s):
    return "" if s is None else f"{s['sim']:.3f} / {s['real']:.3f} = {s['sim'] / s['real']:.2f}x ({s['steps']} steps)"


def curve_report(run_dir):
    """Test EM vs the share k/6 of real-tool RL steps, from SFT-1&2&3 at equal total steps (k = 6: the main run), and
    the simulated steps' mean reward over that of the same steps of the all-real run (same seed: the same prompts)."""
    rows = rl_rows(run_dir, {f"{k}/6": (os.path.join(run_dir, "" if k == 6 else "curve", "eval", label), "sft-123")
                             for k, label in CURVE.items()})
    real = [reward for _, reward in step_rewards(rows["6/6"]["model"])]
    for x in rows.values():
        sim = [reward for env, reward in step_rewards(x["model"]) if env != "real"]  # the first steps of a run
        x["sim_step_reward"] = {"sim": float(np.mean(sim)), "real": float(np.mean(real[:len(sim)])),
                                "steps": len(sim)} if sim else None
    md = ["## Test EM vs the share of RL steps on the real tool (from SFT-1&2&3, equal total steps; 95% bootstrap)", ""]
    md += _md_table(["real steps", "avg", "gain over sft-123", "unknown_multihop", "gain multihop", "real calls",
                     "simulated step reward / all-real's, same steps"],
                    [[k, _ci(x["avg"]), _ci(x["avg_gain"], True), _ci(x["unknown_multihop"]),
                      _ci(x["unknown_multihop_gain"], True), x["real_calls"], _sim_vs_real(x["sim_step_reward"])]
                     for k, x in rows.items()])

    def draw(fig, ax):
        xs, avg = [int(k.split("/")[0]) / 6 for k in rows], [x["avg"] for x in rows.values()]
        yerr = 100 * np.array([[a["value"] - a["lo"], a["hi"] - a["value"]] for a in avg]).T  # (2, points)
        ax.errorbar(xs, [100 * a["value"] for a in avg], yerr=yerr, fmt="o-", capsize=3)
        ax.set(xlabel="share of RL steps on the real tool", ylabel="test EM, avg (%)", title="Simulated vs real RL")
    _plot(os.path.join(run_dir, "curve.png"), draw, (5, 3.5), bbox_inches="tight")
    return "\n".join(md) + "\n", rows


# -----------------------------------------------------------------------------
# CLI: Table 1 of a run.sh run

def main(argv=None):
    p = argparse.ArgumentParser(description="Table 1 of a run.sh run from its eval/ dirs (see the docstring)")
    p.add_argument("--run", required=True, help="the run directory (out/<run>) holding eval/LABEL/ per row")
    p.add_argument("--rows", nargs="+", help="row labels, in table order (eval/LABEL must exist)")
    p.add_argument("--stage-seconds", type=float, default=None, help="sum of the stages' times, printed under the table")
    p.add_argument("--wall-seconds", type=float, default=None, help="the run's wall time, printed under the table")
    p.add_argument("--seeds", action="store_true", help="instead: RL rows over seed 0 and every OUT/seedN, mean and sd")
    p.add_argument("--curve", action="store_true", help="instead: EM vs the share of real RL steps (run.sh --curve)")
    args = p.parse_args(argv)
    for flag, name, build in (("seeds", "rl_seeds", seeds_report), ("curve", "curve", curve_report)):
        if getattr(args, flag):
            md, data = build(args.run)
            write_atomic(os.path.join(args.run, name + ".md"), md)
            write_atomic(os.path.join(args.run, name + ".json"), json.dumps(data, indent=2) + "\n")
            print(md)
            return
    if not args.rows:
        p.error("--rows is required (or --seeds / --curve)")
    md, rows, extras = world_table(args.run, args.rows, args.stage_seconds, args.wall_seconds)
    write_atomic(os.path.join(args.run, "results.md"), md)
    write_atomic(os.path.join(args.run, "results.json"),
                 json.dumps({"rows": rows, "stage_seconds": args.stage_seconds, "wall_seconds": args.wall_seconds,
                             **extras}, indent=2) + "\n")

    def draw(fig, ax):  # Figure 3 of the run, a line per agent row
        for label, b in extras["fig3"].items():
            ax.plot(FIG3_BUCKETS, [100 * (b[k]["success_rate"] or 0) for k in FIG3_BUCKETS], marker="o", label=label)
        ax.set(xlabel="#actions", ylabel="EM (%)", title="Success rate by number of actions (Figure 3)")
        ax.legend(fontsize=7)
    png = _plot(os.path.join(args.run, "results_fig3.png"), draw, (6, 4), bbox_inches="tight")
    print(md)
    print(f"wrote {args.run}/results.md and results.json" + (" and results_fig3.png" if png else ""))


if __name__ == "__main__":
    main()
