"""RESULTS.md and the accuracy-against-FLOPs plots, regenerated from the benchmark JSON.

Nothing here trains or measures: every number comes from ``<out>/<profile>.json`` (``-`` in a
profile's name becomes ``_`` in its file names), so the table can always be rebuilt
(``python -m benchmarks.compare --report-only``) and checked against the raw records.
"""

from __future__ import annotations

import io
import json
import math
import os
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from s2hpruner.app.files import atomic_write_bytes  # noqa: E402

TWO_NETWORK = ("s2h", "s2h-no-gs", "s2h-coupled", "s2h-no-gap-on-mask")
METHOD_ORDER = (*TWO_NETWORK[:1], "dmp", *TWO_NETWORK[1:], "l1", "l1-ft", "group-sl", "random")

DESCRIPTIONS = {
    "s2h": "S2HPruner: soft and hard networks trained together, hard one distilled, exported",
    "dmp": "differentiable mask pruning: soft network only, discretised at the end",
    "s2h-no-gs": "ablation: no G_s (unidirectional distillation)",
    "s2h-coupled": "ablation: G_s also reaches the weights (coupled bidirectional)",
    "s2h-no-gap-on-mask": "ablation: no gap gradient on the width logits",
    "l1": "train the full model for the whole budget, prune by global L1 magnitude, no fine-tuning",
    "l1-ft": "pre-train, prune by global L1 magnitude, fine-tune (pre-train + fine-tune = budget)",
    "group-sl": "sparse training with GroupNormPruner's regulariser, prune by group L2 norm, "
    "fine-tune",
    "random": "random widths at the target FLOPs (inherited random init), trained from scratch",
}
# what the methods do when they all start from one trained checkpoint (profile from-trained)
FROM_TRAINED = {
    "l1-ft": "prune the trained model by L1 magnitude (global or uniform allocation, chosen "
    "on validation; at once, or iteratively over the start of the fine-tuning where the search "
    "offers it), fine-tune for the whole budget",
    "group-sl": "sparse-train the trained model with GroupNormPruner's regulariser for a share "
    "of the budget (chosen on validation), prune by group L2 norm, fine-tune for the rest",
    "random": "random widths at the target FLOPs, inheriting the kept channels' trained "
    "weights, fine-tuned for the whole budget",
}
BUDGET_ORDER = ("epochs", "compute", "long", "long-compute")
# a compute-matched budget and the budget whose two-network runs are its reference
REFERENCE = {"compute": "epochs", "long-compute": "long"}
COMPUTE_BUDGETS = tuple(REFERENCE)  # each paired with S2HPruner's runs of the budget it prices
MARKERS = {"epochs": "o", "compute": "o", "long": "s", "long-compute": "s"}


# How far above its FLOPs target a run's exported network may land and still meet the
# budget: a search chooses only among candidates within it (compare.pick), and the summary
# marks a row with a run beyond it. torch-pruning's round_to can stop far above the target
# (round 36: one-shot L1 in multiples of 8 at 0.15 exported 0.34 and 0.42 of the FLOPs, and
# 0.42 won validation), and a network with more FLOPs than the budget is not a choice at it.
BUDGET_SLACK = 0.01


def file_stem(profile: str) -> str:
    """The stem of a profile's JSON and PNG: ``from-trained`` -> ``from_trained``."""
    return profile.replace("-", "_")


def load_results(out: Path) -> list[dict]:
    """Every comparison JSON in ``out`` (``<profile>.json`` with a ``runs`` list); other JSON
    there, such as the speed benchmark's, is left alone."""
    found = []
    for path in sorted(Path(out).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if (
            isinstance(data, dict)
            and isinstance(data.get("runs"), list)
            and file_stem(str(data.get("profile"))) == path.stem
            and {"machine", "settings"} <= set(data)
        ):
            found.append(data)
    return found


_write = atomic_write_bytes  # via a temporary file and a rename, with the usual file mode


def _order(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _budget_rank(budget: str) -> int:
    """Epochs-budget tables first: the compute table refers back to them; long ones last."""
    return BUDGET_ORDER.index(budget) if budget in BUDGET_ORDER else len(BUDGET_ORDER)


def _budget(item) -> int:
    return _budget_rank(item[0][1])


def aggregate(runs: list[dict]) -> dict[tuple[float, str], list[dict]]:
    """Runs grouped by (target, budget), then by method: each row holds every seed's values."""
    groups: dict[tuple[float, str, str], list[dict]] = defaultdict(list)
    for run in runs:
        groups[(round(run["target_flops"], 6), run["budget"], run["method"])].append(run)
    tables: dict[tuple[float, str], list[dict]] = defaultdict(list)
    for (target, budget, method), members in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1], _order(kv[0][2]))
    ):
        row = {"method": method, "seeds": sorted(r["seed"] for r in members)}
        for key in (
            "epochs",
            "top1_hard",
            "top1_soft",
            "gap",
            "flops_ratio",
            "params_ratio",
            "wall_seconds",
        ):
            row[key] = [r[key] for r in members if r.get(key) is not None]
        tables[(target, budget)].append(row)
    return tables


def _fmt(values: list[float], digits: int = 2, scale: float = 1.0) -> str:
    if not values:
        return "–"
    values = [v * scale for v in values]
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _table(rows: list[dict], label=lambda row: f"`{row['method']}`") -> list[str]:
    lines = [
        "| Method | Seeds | Epochs | Top-1 exported (%) | Top-1 soft (%) | Gap (pp) | "
        "FLOPs ratio | Params ratio | Wall (min) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {label(row)} | {', '.join(map(str, row['seeds']))} | {_fmt(row['epochs'])} | "
            f"{_fmt(row['top1_hard'])} | {_fmt(row['top1_soft'])} | {_fmt(row['gap'])} | "
            f"{_fmt(row['flops_ratio'], 3)} | {_fmt(row['params_ratio'], 3)} | "
            f"{_fmt(row['wall_seconds'], 1, 1 / 60)} |"
        )
    return lines


def profile_markdown(results: dict, image: str | None) -> list[str]:
    """The section of one profile: provenance, settings, then one table per target and
    budget kind."""
    m, s = results["machine"], results["settings"]
    lines = [
        f"## Profile `{results['profile']}`",
        "",
        f"- Command: `{results['command']}`",
    ]
    for command in results.get("resumed_by", []):
        lines.append(f"- Resumed with: `{command}`")
    lines += [
        f"- Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
        f"{m['device']}; Python {m['python']}, torch {m['torch']}, "
        f"torch-pruning {m['torch_pruning']}",
        f"- Model `{s['model']}` on `{s['dataset']}`: {s['epochs']:g} epochs, batch "
        f"{s['batch_size']}, lr {s['lr']:g} (SGD, Nesterov momentum 0.9, weight decay 5e-4 on "
        f"weights, cosine per stage), val split {_val_size(s)}, train subset "
        f"{s['train_subset'] or 'all'}; S2HPruner family: {_frozen(s)} with frozen widths"
        + (" (values the search below chooses override these)" if s.get("search") else ""),
    ]
    if s.get("round_to"):
        searched = any("round_to" in c for c in (s.get("search") or {}).get("s2h", ()))
        lines.append(
            f"- Aligned widths: every width the S2HPruner family keeps is a multiple of "
            f"{s['round_to']} or the full width (`round_to`"
            f"{', or the step the search below chooses' if searched else ''}); the baselines "
            f"keep any width"
        )
    if s.get("prune_at_freeze"):
        lines.append(
            "- Last phase on the pruned network: once the widths freeze, the S2HPruner family "
            "trains the physically pruned network itself (`prune_at_freeze`)"
        )
    if s.get("importance", "producers") != "producers":
        lines.append(
            "- Channel ranking: the S2HPruner family ranks each group's channels by "
            "torch-pruning's group L1 importance, as the `l1-ft` baseline does, not by its "
            f"producers' L1 norms alone (`importance: {s['importance']}`)"
        )
    if s.get("search_start", "full") != "full":
        lines.append(
            "- Search start: the S2HPruner family's width search starts at the widths of "
            "uniform pruning at the budget, not at the nearly full network (`search_start: "
            f"{s['search_start']}`)"
        )
    o = s["options"]
    pretrain = (
        "prunes the starting model at once"
        if o["pretrain_fraction"] <= 0
        else f"pre-trains {o['pretrain_fraction']:.0%} of the budget"
    )
    ran = {r["method"] for r in results["runs"]}
    group_sl = (
        f"`group-sl` sparse-trains {o['sparse_fraction']:.0%} (reg {o['group_sl_reg']:g}, "
        f"weight decay {o['sparse_weight_decay']:g} while regularising); "
        if "group-sl" in ran or not ran else ""
    )
    lines.append(
        f"- Baselines: `l1-ft` {pretrain}; {group_sl}importance methods "
        f"search the {'global ' if o.get('l1_global', True) else ''}pruning ratio to within "
        f"{o['flops_tolerance']:g} of the target"
        + (" (values the search below chooses override these)" if s.get("search") else "")
    )
    if results.get("reused_from"):
        reused = results["reused_from"]
        lines.append(
            f"- Runs of {', '.join(f'`{m}`' for m in reused['methods'])} (and the compute "
            f"ratios, if S2HPruner's search is the same) are those of `{reused['file']}`: this "
            "profile differs from it only in the search of the other methods or in how (or "
            "in which process) a compute budget times and prices their steps (`--reuse-from`)"
        )
    costs = [r["own_step_pricing"] for r in results["runs"] if r.get("own_step_pricing")]
    if costs:
        lines.append(
            "- Compute budgets priced by each method's own steps (`compute_pricing: "
            "own-steps`): a step of the network a baseline trains costs "
            + ", ".join(f"{c['ratio']:.2f}" for c in costs)
            + " full-model steps here (timed side by side; S2HPruner's pruned last phase is "
            "priced the same way in its compute ratio). Rounds 6-34 priced it at 1"
        )
    if results.get("settings", {}).get("timing_process") == "fresh":
        lines.append(
            "- Every timing of a compute budget (S2HPruner's step against a plain one, each "
            "baseline's price) ran in a newly spawned process (`timing_process: fresh`), not "
            "in the benchmark's, where an earlier run's report timed in the process pinned "
            "the allocator and a pruned network then trained at another speed (MEASUREMENTS, "
            "round 41)"
        )
    lines += _checkpoint_lines(results, ran)
    ratios = results.get("compute_ratios", {})
    if ratios:
        parts = [
            f"{key}: {r['ratio']:.2f} ({r['s2h_seconds_per_epoch']:.0f} s / "
            f"{r['plain_seconds_per_epoch']:.0f} s)"
            for key, r in sorted(ratios.items())
        ]
        lines.append(
            "- Compute ratio (S2HPruner seconds per epoch / plain seconds per epoch of the full "
            f"model, measured in this benchmark): {'; '.join(parts)}"
        )
        if any(r.get("timing") == "side by side" for r in ratios.values()):
            turns = sorted({r["turns"] for r in ratios.values() if r.get("turns")})
            lines.append(
                "  (timed side by side in one process: blocks of S2HPruner steps, each beside "
                "a block of plain full-model steps on the same batches, in alternating order; "
                "the joint search walked in full, the other phases held for "
                f"{', '.join(map(str, turns))} pairs of turns (median); the phases' ratios "
                "weighted by their share of the steps, plus one-off work (layout tuning, the "
                "projection when the widths freeze); S2HPruner's seconds are the ratio times "
                "the plain epoch: "
                + "; ".join(
                    f"{key}: " + ", ".join(f"{phase} {v['ratio']:.2f} x {v['fraction']:.2f}"
                                           for phase, v in r["phases"].items())
                    + f", one-off {r.get('one_off_seconds', 0):.1f} s"
                    for key, r in sorted(ratios.items()) if r.get("phases")
                ) + ")"
            )  # fmt: skip
        if any(r.get("plain_timed_steps") for r in ratios.values()):
            steps = sorted({r["plain_timed_steps"] for r in ratios.values() if
                            r.get("plain_timed_steps")})  # fmt: skip
            lines.append(
                "  (no method trains the full model here, so its plain seconds per epoch were "
                f"timed on {', '.join(map(str, steps))} training steps of the starting model "
                "with the same recipe and batches)"
            )
    if image:
        lines += ["", f"![top-1 against FLOPs ratio]({image})"]

    if s.get("search"):
        lines += [""] + _search_lines(results)

    tables = aggregate(results["runs"])
    long = s.get("long_factor", 3.0)
    for (target, budget), rows in sorted(tables.items(), key=lambda kv: (kv[0][0], _budget(kv))):
        lines += ["", f"### Target {target:g}, {budget} budget", ""]
        if budget not in REFERENCE:
            lines.append(
                "Every method trains for the same number of epochs"
                + (f" ({long:g} x the base budget)." if budget == "long" else ".")
            )
            lines += [""] + _table(rows)
            continue
        base = REFERENCE[budget]
        epochs = "the epochs" if base == "epochs" else f"the {base} budget's epochs"
        priced = s.get("compute_pricing") == "own-steps"
        lines.append(
            f"Single-network methods train for {epochs} x the compute ratio"
            + (" in full-model epochs of wall time: each trains as many steps of its own "
               "network as that pays for, a step priced by timing its network against the "
               "full model's side by side (`epochs` below: the steps it trained, in epochs)"
               if priced else "")
            + f"; the two-network S2HPruner runs of the {base} budget are repeated here as "
            "the reference."
        )  # fmt: skip
        reference = [r for r in tables.get((target, base), []) if r["method"] in TWO_NETWORK]
        lines += [""] + _table(
            reference + rows,
            lambda row, base=base: (
                f"`{row['method']}`" + (f" ({base} budget)" if row["method"] in TWO_NETWORK else "")
            ),
        )
    return lines


def _val_size(s: dict) -> str:
    if s.get("val_size") is None:
        return "10% of the training files (at most 5,000)"
    return f"{s['val_size']:g}"


def _frozen(s: dict) -> str:
    if s.get("freeze_epochs") is not None:
        return f"last {s['freeze_epochs']:g} epoch(s)"
    return f"last {s.get('freeze', 0.25):.0%} of the run"


def _checkpoint_lines(results: dict, ran: set[str]) -> list[str]:
    """Where every method starts: the checkpoint, its hash and what it scores; what the
    baselines that ran (all of them, before any ran) do from it."""
    c = results.get("checkpoint")
    if not c:
        return []
    lines = [
        f"- Every method starts from the trained checkpoint `{c['path']}` (sha256 "
        f"`{c['sha256'][:16]}…`): **{c['test_top1']:.2f}%** test top-1, {c['val_top1']:.2f}% "
        f"validation top-1 (seed {c['val_split_seed']}'s split, held out when it was trained)",
    ]
    if c.get("pretrain_command"):
        made = c.get("pretrain") or {}
        extra = f", {made['train_seconds']:.0f} s" if made.get("train_seconds") else ""
        lines.append(f"  (made once with plain PyTorch: `{c['pretrain_command']}`{extra})")
    lines += [f"- `{m}` from a trained model: {text}" for m, text in FROM_TRAINED.items()
              if m in ran or not ran]
    return lines


def _hyper_text(hyper: dict) -> str:
    parts = []
    for key, value in hyper.items():
        if key == "l1_global":
            parts.append("global L1" if value else "uniform L1")
        elif key == "freeze":
            parts.append(f"freeze {value:.0%}")
        elif key == "sparse_fraction":
            parts.append(f"sparse {value:.0%}")
        elif key == "l1_steps":
            parts.append(f"iterative in {value} steps" if value > 1 else "pruned at once")
        elif key == "l1_descent":
            parts.append(f"over {value:.0%} of the fine-tuning")
        elif key == "descent":
            parts.append(f"descent over {value:.0%} of the search" if value else "no descent")
        elif key == "ignored_layers":
            groups = "channel group" + ("s" if len(value) > 1 else "")
            parts.append(f"the {groups} of {', '.join(value)} kept whole" if value
                         else "no layer kept whole")  # fmt: skip
        elif key == "freeze_teacher":
            parts.append({"none": "last phase: hard network alone",
                          "start": "last phase distilled from the starting weights"}.get(
                              value, f"last phase distilled from {value}"))  # fmt: skip
        else:
            parts.append(f"{key} {value:g}" if isinstance(value, int | float) else f"{key} {value}")
    return ", ".join(parts) or "base"


def _search_lines(results: dict) -> list[str]:
    """The validation-split search: every candidate's val top-1, the chosen one in bold."""
    s = results["settings"]
    ran = {run["method"] for run in results["runs"]}
    if all(len(candidates) == 1 for candidates in s["search"].values()):
        return [
            "### Fixed recipes (no search)",
            "",
            "Each method runs one recipe, chosen on another profile's validation split (its "
            "comment in `benchmarks/compare.py` says which): "
            + "; ".join(f"`{m}`: {_hyper_text(c[0])}" for m, c in s["search"].items() if m in ran)
            + ". Every seed and budget runs it.",
        ]
    by_source: dict[str, list[str]] = {}
    for m, b in sorted(s.get("borrow", {}).items()):
        if m in ran:
            by_source.setdefault(b, []).append(f"`{m}`")
    borrowed = "; ".join(
        f"{', '.join(ms)} {'uses' if len(ms) == 1 else 'use'} `{b}`'s"
        for b, ms in by_source.items()
    )
    targets = s.get("tune_targets") or []
    where = f" at target {', '.join(f'{t:g}' for t in targets)}" if targets else ""
    budgets = s.get("tune_budgets", [])
    lines = [
        "### Hyper-parameter search (validation split)",
        "",
        f"Seed {s.get('tune_seed', 0)}{where}, on the {' and '.join(budgets)} "
        f"budget{'s' if len(budgets) > 1 else ''}: every candidate is a complete run; the one "
        "with the best validation top-1 (exported model for the baselines, hard network after "
        "the last epoch for the S2HPruner family; ties go to the first, the base recipe) is the "
        "run reported below. The test split plays no part. Other seeds"
        + (", targets" if targets else "")
        + " and budgets reuse that choice"
        + (f" (every seed validates on split seed {s['split_seed']}'s held-out images, which "
           "the checkpoint never saw)" if s.get("split_seed") is not None else "")
        + (f", and {borrowed} choice (an ablation differs in one part only)." if borrowed else ".")
        + (f" Note: {results['settings_note']}." if results.get("settings_note") else ""),
        "",
        "| Method | Target | Budget | Epochs | Candidates: val top-1 (%) |",
        "|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for entry in results.get("tuning", []):
        key = (_order(entry["method"]), round(entry["target_flops"], 6),
               _budget_rank(entry["budget"]), entry["method"], entry["budget"])  # fmt: skip
        groups[key].append(entry)
    for key in sorted(groups):
        entries = groups[key]
        cells = []
        for e in entries:
            val = "–" if e["val_top1"] is None else f"{e['val_top1']:.2f}"
            text = f"{_hyper_text(e['hyper'])}: {val}"
            cells.append(f"**{text}**" if e["chosen"] else text)
        epochs = entries[0]["record"].get("epochs")
        lines.append(
            f"| `{key[3]}` | {key[1]:g} | {key[4]} | {'–' if epochs is None else f'{epochs:g}'} "
            f"| {'; '.join(cells)} |"
        )
    return lines


def equal_compute_summary(results: dict, budget: str = "compute") -> list[dict]:
    """Per target: S2HPruner against each method of the compute budget (or of ``long-compute``
    against S2HPruner's long runs), on the seeds both ran (paired, so a seed one of them lacks
    cannot tilt the mean). Test and validation top-1."""
    reference = REFERENCE[budget]
    runs: dict[tuple[float, str, int], dict] = {}
    for run in results["runs"]:
        if (run["method"], run["budget"]) == ("s2h", reference) or run["budget"] == budget:
            runs[(round(run["target_flops"], 6), run["method"], run["seed"])] = run

    def searched(method: str, target: float | None = None) -> bool:
        """Whether the method's recipe was chosen among several on this profile's validation
        split (at ``target``, if given; else it was carried over from elsewhere)."""
        return any(len(r.get("candidates") or ()) > 1 for r in results["runs"]
                   if r["method"] == method and (target is None or round(
                       r["target_flops"], 6) == target))  # fmt: skip

    def mean(members: list[dict], key: str) -> float | None:
        values = [r[key] for r in members if r.get(key) is not None]
        return statistics.fmean(values) if len(values) == len(members) else None

    rows = []
    for target in sorted({t for t, m, _ in runs if m == "s2h"}):
        ours = {seed: run for (t, m, seed), run in runs.items() if (t, m) == (target, "s2h")}
        others = sorted({m for t, m, _ in runs if t == target and m != "s2h"}, key=_order)
        for method in others:
            seeds = sorted(s for (t, m, s) in runs if (t, m) == (target, method) and s in ours)
            if not seeds:
                continue
            theirs = [runs[(target, method, s)] for s in seeds]
            row = {"target": target, "budget": budget, "method": method, "seeds": seeds,
                   "ratio": statistics.fmean(r["compute_ratio"] for r in theirs),
                   "searched": searched(method),
                   "searched_here": searched(method, target),
                   "s2h_searched": searched("s2h")}  # fmt: skip
            for split, key in (("test", "top1_hard"), ("val", "val_top1")):
                row[f"s2h_{split}"] = mean([ours[s] for s in seeds], key)
                row[f"other_{split}"] = mean(theirs, key)
            both = row["s2h_test"] is not None and row["other_test"] is not None
            row["lead_test"] = row["s2h_test"] - row["other_test"] if both else None
            # how often the mean's sign holds seed by seed (ties count for neither), and how
            # far the mean can be trusted: the standard error of the seed-by-seed lead
            leads = [ours[s]["top1_hard"] - run["top1_hard"]
                     for s, run in zip(seeds, theirs, strict=True)]  # fmt: skip
            row["seeds_ahead_test"] = sum(lead > 0 for lead in leads)
            row["lead_test_se"] = (statistics.stdev(leads) / math.sqrt(len(leads))
                                   if len(leads) > 1 else None)  # fmt: skip
            # a run above its budget (a choice carried from another target, or one run that
            # landed off it): the row says so, with the largest FLOPs ratio
            for side, members in (("s2h", [ours[s] for s in seeds]), ("other", theirs)):
                worst = max(r.get("flops_ratio") or 0.0 for r in members)
                row[f"off_budget_{side}"] = worst if worst > target + BUDGET_SLACK else None
            # priced by own steps before round 37: the pruned network timed in the run's
            # layout (channels_last), not the faster one S2HPruner's rule picks
            row["priced_untuned"] = any("own_step_pricing" in r and "proxy_layout" not in
                                        r["own_step_pricing"] for r in theirs)  # fmt: skip
            rows.append(row)
    return rows


def _times(results: dict, row: dict) -> str:
    """`` (3x)`` on a row of the long budget: its epochs are the base budget's times this."""
    if row["budget"] == "compute":
        return ""
    return f" ({results.get('settings', {}).get('long_factor', 3.0):g}x)"


def _summary_lines(all_results: list[dict]) -> list[str]:
    """The table a reader of issue #15 wants first: each from-trained profile's S2HPruner
    against every other method at equal compute, mean over the seeds both ran."""

    def cell(ours: float | None, theirs: float | None, se: float | None = None) -> str:
        if ours is None or theirs is None:
            return "–"
        spread = "" if se is None else f" ± {se:.2f}"
        return f"{ours:.2f} / {theirs:.2f} (**{ours - theirs:+.2f}**{spread})"

    lines = []
    for results in all_results:
        if not results.get("checkpoint"):
            continue
        ratios = results.get("compute_ratios", {}).values()
        timed = "" if all(r.get("timing") == "side by side" for r in ratios) else " *"
        own_steps = results.get("settings", {}).get("compute_pricing") == "own-steps"
        by_target: dict[tuple[float, str], list[dict]] = defaultdict(list)
        for budget in COMPUTE_BUDGETS:
            for row in equal_compute_summary(results, budget):
                by_target[(row["target"], budget)].append(row)
        for rows in by_target.values():  # the method S2HPruner leads least on test
            row = min(rows, key=lambda r: math.inf if r["lead_test"] is None else r["lead_test"])
            mark = ("" if row["searched_here"] else " ‡" if row["searched"]
                    else " °" if not row["s2h_searched"] else " †")  # fmt: skip
            off = [f"{who} up to {row[f'off_budget_{side}']:.3f}" for side, who in (
                ("s2h", "S2HPruner"), ("other", "it")) if row[f"off_budget_{side}"]]  # fmt: skip
            if off:
                mark += f" ◊ (FLOPs: {', '.join(off)})"
            priced = "" if not own_steps else " §¹" if row["priced_untuned"] else " §"
            lines.append(
                f"| `{results['profile']}` | {row['target']:g}{_times(results, row)} | "
                f"`{row['method']}`{mark} | "
                f"{', '.join(map(str, row['seeds']))} | {row['ratio']:.2f}{timed}{priced} | "
                f"{cell(row['s2h_test'], row['other_test'], row['lead_test_se'])} | "
                f"{row['seeds_ahead_test']} of {len(row['seeds'])} | "
                f"{cell(row['s2h_val'], row['other_val'])} |"
            )
    if not lines:
        return []
    return [
        "## At a glance: S2HPruner against the strongest other method at equal compute, "
        "from a trained model",
        "",
        "Each row: S2HPruner's runs of the epochs budget (on a row marked 3x, of the long "
        "budget: three times the epochs) against the method given those epochs x "
        "the compute ratio (timed per target and seed) that S2HPruner leads least on test, "
        "mean over the seeds both ran. Cells: S2HPruner / that method (S2HPruner's lead, and "
        "on test, where several seeds ran, ± the standard error of the seed-by-seed lead); "
        "exported top-1 (%). †: that method's recipe was not chosen on this profile's "
        "validation split but carried over from another profile, so the row flatters "
        "S2HPruner; ‡: chosen on this profile's validation split at another target and "
        "carried to this one (the profile's section says where S2HPruner's own was chosen); "
        "°: neither method searched here, both at the recipe chosen for it elsewhere (the "
        "profile's section says where), so the row favours neither. "
        "*: the compute ratio is wall times divided, not timed side by side, and noisier. "
        f"◊: a run of the row exported more than {BUDGET_SLACK:g} above the FLOPs target "
        "(the largest ratio given): off the budget, so the row does not compare like with "
        "like. "
        "§: the other method's steps are priced at its own network's measured cost (equal "
        "wall time), not as full-model steps, as S2HPruner's pruned last phase always was "
        "(rounds 6-34 charged a baseline's pruned step as a full one; MEASUREMENTS round 35), "
        "its pruned network trained and timed in the faster of NCHW and channels_last, as "
        "S2HPruner's is (round 37); §¹: priced so in rounds 35-36, but in channels_last only, "
        "which made unaligned L1 networks cost 1.0-1.4 full-model steps instead of 0.5-1.1, "
        "so the row flatters S2HPruner. "
        "Ahead on: the seeds on which S2HPruner's test top-1 is above that "
        "method's (two runs of one recipe differ by up to ~0.3 here, so a mean lead that "
        "half the seeds contradict is noise). The profiles' sections below say what each "
        "changes.",
        "",
        "| Profile | Target | Strongest other | Seeds | Compute ratio | Test | Ahead on "
        "(test) | Validation |",
        "|---|---|---|---|---|---|---|---|",
        *lines,
        "",
    ]


def markdown(all_results: list[dict], images: dict[str, str]) -> str:
    lines = [
        "# Benchmark results",
        "",
        "Generated by `python -m benchmarks.compare` from the JSON beside the plots "
        "(rebuild with `--report-only`); do not edit by hand. Top-1 is measured on the test "
        "split, on the exported, physically pruned model; its FLOPs and parameter ratios are "
        "counted by `s2hpruner.count_flops` / `count_params` against the unpruned model. "
        "Where several seeds ran, cells show mean ± standard deviation. Soft top-1 and gap "
        "exist only for methods with a soft network.",
        "",
        *_summary_lines(all_results),
        "Methods:"
        if not any(r.get("checkpoint") for r in all_results)
        else "Methods (as run from scratch; a profile that starts from a trained model says in "
        "its section what changes):",
        "",
    ]
    seen = {run["method"] for r in all_results for run in r["runs"]}
    lines += [f"- `{m}`: {DESCRIPTIONS.get(m, '')}" for m in sorted(seen, key=_order)]
    for results in all_results:
        lines += [""] + profile_markdown(results, images.get(results["profile"]))
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> Path:
    """Exported top-1 against FLOPs ratio: one colour per method, filled markers and solid
    lines for the epochs budget, hollow markers and dashed lines for the compute budget."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    tables = aggregate(results["runs"])
    series: dict[tuple[str, str], list[tuple[float, float, float]]] = defaultdict(list)
    for (_, budget), rows in tables.items():
        for row in rows:
            if not row["top1_hard"]:
                continue
            acc = row["top1_hard"]
            std = statistics.stdev(acc) if len(acc) > 1 else 0.0
            series[(row["method"], budget)].append(
                (statistics.fmean(row["flops_ratio"]), statistics.fmean(acc), std)
            )
    methods = sorted({m for m, _ in series}, key=_order)
    colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    for target in sorted({round(r["target_flops"], 6) for r in results["runs"]}):
        ax.axvline(target, color="grey", linestyle=":", linewidth=1)
    start = (results.get("checkpoint") or {}).get("test_top1")
    if start is not None:
        ax.axhline(start, color="black", linestyle="-.", linewidth=1,
                   label=f"starting model ({start:.2f}%)")  # fmt: skip
    ordered = sorted(
        series.items(),
        key=lambda kv: (_order(kv[0][0]), _budget_rank(kv[0][1])),
    )
    for (method, budget), points in ordered:
        points.sort()
        xs, ys, errs = zip(*points, strict=True)
        compute = budget in REFERENCE
        ax.errorbar(
            xs,
            ys,
            yerr=errs,
            color=colours[method],
            marker=MARKERS.get(budget, "o"),
            capsize=3,
            linestyle="--" if compute else "-",
            markerfacecolor="none" if compute else colours[method],
            label=method if budget == "epochs" else f"{method} ({budget})",
        )
    _clip_far_below(ax, ordered, start, colours)
    ax.set_xlabel("FLOPs ratio of the exported model")
    ax.set_ylabel("test top-1 of the exported model (%)")
    s = results["settings"]
    title = f"{results['profile']}: {s['model']} on {s['dataset']}, {s['epochs']:g} epochs"
    if s.get("init"):
        title += " from a trained model"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 8:  # many methods and budgets: the legend beside the axes
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    elif series:
        ax.legend(fontsize=8, loc="best")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    _write(path, buffer.getvalue())
    return path


def _clip_far_below(ax, ordered, start: float | None, colours: dict, far: float = 15.0) -> None:
    """Points more than ``far`` points below the starting model (a collapsed export, as
    dmp's) would squeeze every other method into a line: keep the axis on the rest and mark
    each such point at the bottom edge with its value."""
    values = [y for _, points in ordered for _, y, _ in points]
    near = [y for y in values if start is None or y >= start - far]
    if start is None or not near or len(near) == len(values):
        return
    low = min(near) - 1.0
    ax.set_ylim(low, start + 1.0)
    for (method, _), points in ordered:
        for x, y, _ in points:
            if y < low:
                ax.annotate(f"{method}: {y:.1f}% (off the axis)", (x, low), xytext=(0, 14),
                            textcoords="offset points", ha="center", fontsize=7,
                            color=colours[method],
                            arrowprops={"arrowstyle": "->", "color": colours[method]})


def write_reports(out: Path, markdown_path: Path) -> list[Path]:
    """Redraw ``<out>/<profile>.png`` for every JSON in ``out`` and rewrite ``markdown_path``."""
    all_results = load_results(out)
    if not all_results:
        raise FileNotFoundError(f"no benchmark JSON (with a 'runs' list) in {out}")
    images, written = {}, []
    for results in all_results:
        png = plot(results, Path(out) / f"{file_stem(results['profile'])}.png")
        images[results["profile"]] = Path(os.path.relpath(png, markdown_path.parent)).as_posix()
        written.append(png)
    text = markdown(all_results, images)
    coverage = Path(out) / "coverage.json"  # benchmarks.coverage owns that section: keep it
    if coverage.exists():
        from .coverage import markdown as coverage_markdown

        text = text.rstrip("\n") + "\n\n" + coverage_markdown(json.loads(coverage.read_text()))
    _write(markdown_path, text.encode())
    return [*written, markdown_path]
