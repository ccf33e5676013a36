"""Text reports of ``python -m cpubn bench``: the main bench's table, summary and thread
scaling, and the two tables (times, ratios) every sweep variant prints."""

from __future__ import annotations

import statistics

from .harness import LAYOUTS, OPS, machine_label, shape_label


def format_sweep(header, results, threads, peers, ratio_names, summarized, ops, footer):
    """The report of a variant bench (--fused, --half): per thread count, a table of median
    times (ms) of ``peers`` and one of ``ratio_names``, the median over cases of each
    ratio in ``summarized`` per op, and any errors."""
    def cells(record, key, names, width, digits):
        return " ".join(f"{'-' if record[key].get(n) is None else f'{record[key][n]:.{digits}f}':>{width}}"
                        for n in names)

    def row_label(r):
        return f"{shape_label(r['shape']):<14} {r['layout']:<6} {r['op']:<8} "

    time_width = max([11] + [len(p) + 1 for p in peers])
    ratio_width = max([11] + [len(n) + 1 for n in ratio_names])
    lines = [header]
    for n in threads:
        records = [r for r in results if r["threads"] == n]
        label = f"{n} thread{'s' if n > 1 else ''}"
        lines += ["", f"== {label}: times in ms ==",
                  f"{'shape':<14} {'layout':<6} {'op':<8} "
                  + " ".join(f"{p:>{time_width}}" for p in peers)]
        lines += [row_label(r) + cells(r, "median_ms", peers, time_width, 3) for r in records]
        lines += ["", f"== {label}: ratios (same run) ==",
                  f"{'shape':<14} {'layout':<6} {'op':<8} "
                  + " ".join(f"{name:>{ratio_width}}" for name in ratio_names)]
        lines += [row_label(r) + (" " + f"busy ({r['busy']})" if r.get("busy") else
                                  cells(r, "ratios", ratio_names, ratio_width, 2))
                  for r in records]
        for op in ops:
            for name in summarized:
                cases = [r for r in records if r["op"] == op and name in r["ratios"]]
                values = [r["ratios"][name] for r in cases if not r.get("busy")]
                left_out = len(cases) - len(values)
                note = f" ({left_out} busy case{'s' if left_out > 1 else ''} left out)" \
                    if left_out else ""
                if values:
                    lines.append(f"  {op}: median {name} {statistics.median(values):.2f} over "
                                 f"{len(values)} cases{note}")
                elif cases:
                    lines.append(f"  {op}: {name}: no result, the machine was busy in all "
                                 f"{len(cases)} cases")
        for r in records:
            for name, error in r["errors"].items():
                lines.append(f"  ! {row_label(r).rstrip()} {name}: {error}")
    busy = sum(bool(r.get("busy")) for r in results)
    if busy:
        lines += ["", f"WARNING: this machine was visibly busy during {busy} of {len(results)} "
                      "cases (a peer's repeats spread 3x or more): their ratios are not "
                      "results (shown as 'busy'); rerun on a quiet machine."]
    return "\n".join(lines + ["", footer])


def _fmt_ms(v):
    if v is None:
        return "-"
    if v < 0.1:
        return f"{v:.3f}"
    if v < 10:
        return f"{v:.2f}"
    if v < 100:
        return f"{v:.1f}"
    return f"{v:.0f}"


def _fmt_ratio(v, digits=2):
    if v is None:
        return "-"
    digits = min(digits, 0 if v >= 100 else 1 if v >= 10 else digits)
    return f"{v:.{digits}f}"


def _peer_cell(record, name, key="median_ms", fmt=_fmt_ms):
    p = record["peers"].get(name)
    if p is None:
        return "-"
    if "error" in p:
        return "ERR"
    return fmt(p.get(key))


COLUMNS = (  # header, width, alignment
    ("shape", 13, "<"), ("layout", 6, "<"), ("op", 8, "<"), ("roof", 6, ">"), ("copy", 6, ">"),
    ("out=", 6, ">"), ("GB/s", 5, ">"), ("xroof", 5, ">"), ("xcopy", 5, ">"), ("cpubn", 6, ">"),
    ("alloc/", 6, ">"), ("numpy", 6, ">"), ("torch", 6, ">"), ("ort", 6, ">"),
    ("vs numpy", 8, ">"), ("vs torch", 8, ">"), ("vs ort", 6, ">"),
)


def _row(cells):
    return " ".join(f"{c:{align}{width}}" for c, (_, width, align) in zip(cells, COLUMNS)).rstrip()


def _torch_cell(record):
    """torch's time; for backward the faster of its two memory formats (marked * when
    that is the other one)."""
    own = record["peers"].get("torch", {}).get("median_ms")
    other = record["peers"].get("torch_other", {}).get("median_ms")
    if other is not None and (own is None or other < own):
        return _fmt_ms(other) + "*"
    return _peer_cell(record, "torch")


def format_table(records):
    lines = [_row([c[0] for c in COLUMNS])]
    for r in records:
        busy = bool(r.get("busy"))
        lines.append(_row([
            shape_label(r["shape"]), r["layout"], r["op"], _fmt_ms(r.get("roofline_ms")),
            _peer_cell(r, "copy"),
            _peer_cell(r, "cpubn_out"),
            _peer_cell(r, "cpubn_out", "gbps", lambda v: "-" if v is None else f"{v:.1f}"),
            _peer_cell(r, "cpubn_out", "x_roofline", _fmt_ratio),
            "busy" if busy else _fmt_ratio(r.get("x_copy")),
            _peer_cell(r, "cpubn"),
            "busy" if busy else _fmt_ratio(r.get("alloc_over_out")),
            _peer_cell(r, "numpy"),
            _torch_cell(r),
            _peer_cell(r, "onnxruntime"),
            "busy" if busy else _fmt_ratio(r.get("speedup_vs_numpy"), 1),
            "busy" if busy and r.get("speedup_vs_torch") else
            _fmt_ratio(r.get("speedup_vs_torch"), 2),
            "busy" if busy and r.get("speedup_vs_onnxruntime") else
            _fmt_ratio(r.get("speedup_vs_onnxruntime"), 2),
        ]))
        if r["check"] != "ok":
            lines.append(f"  ! {r['check']}")
        if r.get("busy"):
            lines.append(f"  (busy: {r['busy']}; rerun on a quiet machine)")
    return "\n".join(lines)


def _median_of(values):
    values = [v for v in values if v]
    return statistics.median(values) if values else None


def format_summary(records):
    """Median speedups over shapes, per op and layout, of the cases measured while the
    machine was quiet; a peer that did not run (torch not installed) is left out."""
    lines = []
    for op in OPS:
        for layout in LAYOUTS:
            rs = [r for r in records if r["op"] == op and r["layout"] == layout]
            if not rs:
                continue
            quiet = [r for r in rs if not r.get("busy")]
            if not quiet:
                lines.append(f"  {op:<8} {layout}: no result: the machine was busy in all "
                             f"{len(rs)} cases")
                continue
            parts = []
            for peer, digits in (("torch", 2), ("onnxruntime", 2), ("numpy", 1)):
                v = _median_of(r.get(f"speedup_vs_{peer}") for r in quiet)
                if v is not None:
                    parts.append(f"{_fmt_ratio(v, digits)}x vs {peer}")
            left_out = (f" ({len(rs) - len(quiet)} busy case{'s' if len(rs) - len(quiet) > 1 else ''}"
                        f" left out)" if len(quiet) < len(rs) else "")
            lines.append(f"  {op:<8} {layout}: median over {len(quiet)} shapes: "
                         + (", ".join(parts) or "no peer ran") + left_out)
    return "\n".join(lines)


def busy_machine_warning(report):
    """A line saying the machine was visibly busy, or None: the two copy-bandwidth probes
    (before and after the cases) disagree, or some cases were busy (harness.busy_reason)."""
    notes = []
    for n, (first, second) in report.get("copy_probes_gbps", {}).items():
        if min(first, second) > 0 and max(first, second) / min(first, second) >= 1.5:
            notes.append(f"copy bandwidth at {n} thread{'s' if int(n) > 1 else ''} was "
                         f"{min(first, second):.1f} GB/s in one probe, {max(first, second):.1f} "
                         f"in the other")
    busy = [r for r in report["results"] if r.get("busy")]
    if busy:
        notes.append(f"{len(busy)} of {len(report['results'])} cases were timed while it was "
                     f"busy (marked 'busy', left out of the summary)")
    if not notes:
        return None
    return ("WARNING: this machine was visibly busy during the bench: " + "; ".join(notes)
            + ". Its ratios are not results: rerun on a quiet machine.")


def format_scaling(records, threads):
    lo, hi = min(threads), max(threads)
    by_key = {}
    for r in records:
        by_key.setdefault((tuple(r["shape"]), r["layout"], r["op"]), {})[r["threads"]] = r
    lines = [f"Thread scaling {lo} -> {hi} threads (time at {lo} / time at {hi}):",
             f"  {'shape':<14}  {'layout':<6}  {'op':<8}  {'cpubn out=':>10}  {'copy':>6}"]
    for (shape, layout, op), per in by_key.items():
        if lo not in per or hi not in per:
            continue

        def ratio(name):
            a = per[lo]["peers"].get(name, {}).get("median_ms")
            b = per[hi]["peers"].get(name, {}).get("median_ms")
            return a / b if a and b else None
        lines.append(f"  {shape_label(shape):<14}  {layout:<6}  {op:<8}  "
                     f"{_fmt_ratio(ratio('cpubn_out')):>10}  {_fmt_ratio(ratio('copy')):>6}")
    return "\n".join(lines)


def format_report(report):
    m, cfg = report["machine"], report["config"]
    out = [
        f"cpubn {m['cpubn']} bench on {machine_label(m)}, "
        f"{m['platform']}",
        f"numpy {m['numpy']}, torch {m['torch'] or 'not installed'}, OpenMP "
        f"{'on' if m['openmp'] else 'off' if m['openmp'] is False else 'unknown'}; "
        f"dtype {cfg['dtype']}; medians of up to {cfg['repeats']} interleaved repeats",
    ]
    bw = ", ".join(f"{v:.1f} GB/s at {t} thread{'s' if int(t) > 1 else ''}"
                   for t, v in report["copy_bandwidth_gbps"].items())
    out.append(f"copy bandwidth ({cfg['copy_probe_bytes'] // 2**20} MiB, read + write): {bw}")
    warning = busy_machine_warning(report)
    if warning:
        out.append(warning)
    for n in cfg["threads"]:
        rs = [r for r in report["results"] if r["threads"] == n]
        if not rs:
            continue
        out += ["", f"== {n} thread{'s' if n > 1 else ''} ==", format_table(rs), "",
                "Summary:", format_summary(rs)]
    if len(cfg["threads"]) > 1:
        out += ["", format_scaling(report["results"], cfg["threads"])]
    tiny_calls = report.get("tiny_calls") or ([report["tiny"]] if report.get("tiny") else [])
    for tiny in tiny_calls:
        cells = ", ".join(f"{k} {v:.2f} us" for k, v in tiny["us"].items())
        out += ["", f"Tiny call {shape_label(tiny['shape'])} eval, per call: {cells}"]
        for k, v in tiny["errors"].items():
            out.append(f"  ! {k}: {v}")
    out += ["", format_targets(report)]
    if warning:
        out += ["", warning]
    out += ["", LEGEND]
    return "\n".join(out)


# Issue 11's targets, with out= against the same-run copy: (median, worst) per op.
COPY_TARGETS = {"train": (1.8, 3.0), "eval": (1.1, 1.5), "backward": (2.2, 3.5)}
ALLOC_TARGET = 1.15             # allocating / out=, from LARGE_BYTES
SCALING_TARGET = 1.7            # 1 -> 2 threads, from LARGE_BYTES
LARGE_BYTES = 16 * 2**20
TINY_TARGET_US = 3.0            # bn(x) on (1, 16) float32 eval
# Issue 36's targets on 2-D (batch, features) inputs, per thread count: every case at
# least MLP_CASE_TARGET x torch, each op's median at least MLP_MEDIAN_TARGET x torch, and
# from MLP_SCALING_ELEMENTS elements 2 threads at least MLP_SCALING_TARGET x faster than
# one for train and backward.
MLP_CASE_TARGET = 1.0
MLP_MEDIAN_TARGET = 1.3
MLP_SCALING_TARGET = 1.4
MLP_SCALING_ELEMENTS = 4 * 2**20


def _verdict(ok):
    return "met" if ok else "MISSED"


def format_targets(report):
    """Each target of issue 11 met or missed, over the quiet cases of the largest thread
    count run (the scaling target over 1 and 2 threads, when both ran)."""
    results = [r for r in report["results"] if not r.get("busy")]
    threads = report["config"]["threads"]
    top = max(threads)
    at_top = [r for r in results if r["threads"] == top]
    lines = [f"Targets ({top} thread{'s' if top > 1 else ''}, quiet cases, ratios of medians "
             f"within the run):"]
    for op, (median_target, worst_target) in COPY_TARGETS.items():
        values = [(r["x_copy"], r) for r in at_top if r["op"] == op and r.get("x_copy")]
        if not values:
            continue
        med = statistics.median(v for v, _ in values)
        worst, worst_r = max(values, key=lambda item: item[0])
        lines.append(f"  {op:<8} out= / copy: median {med:.2f} (target <= {median_target}, "
                     f"{_verdict(med <= median_target)}), worst {worst:.2f} "
                     f"{shape_label(worst_r['shape'])} {worst_r['layout']} (target <= "
                     f"{worst_target}, {_verdict(worst <= worst_target)})")
    large = [r for r in at_top if r["size_bytes"] >= LARGE_BYTES and r.get("alloc_over_out")]
    if large:
        worst_r = max(large, key=lambda r: r["alloc_over_out"])
        lines.append(f"  allocating / out= from 16 MiB: worst {worst_r['alloc_over_out']:.2f} "
                     f"{shape_label(worst_r['shape'])} {worst_r['layout']} {worst_r['op']} "
                     f"(target <= {ALLOC_TARGET}, "
                     f"{_verdict(worst_r['alloc_over_out'] <= ALLOC_TARGET)})")
    slower = [r for r in at_top if r.get("speedup_vs_torch") and r["speedup_vs_torch"] < 1]
    with_torch = [r for r in at_top if r.get("speedup_vs_torch")]
    if with_torch:
        names = ", ".join(f"{shape_label(r['shape'])} {r['layout']} {r['op']} "
                          f"{r['speedup_vs_torch']:.2f}x" for r in slower)
        lines.append(f"  at least as fast as torch (allocating; backward against its faster "
                     f"layout): {len(with_torch) - len(slower)} of {len(with_torch)} cases"
                     + (f"; slower: {names}" if slower else "")
                     + f" ({_verdict(not slower)})")
    if 1 in threads and 2 in threads:
        by_key = {}
        for r in results:
            if r["size_bytes"] >= LARGE_BYTES and r["threads"] in (1, 2):
                by_key.setdefault((tuple(r["shape"]), r["layout"], r["op"]), {})[r["threads"]] = r
        ratios = []
        for key, per in by_key.items():
            a = per.get(1, {}).get("peers", {}).get("cpubn_out", {}).get("median_ms")
            b = per.get(2, {}).get("peers", {}).get("cpubn_out", {}).get("median_ms")
            if a and b:
                ratios.append((a / b, key))
        if ratios:
            worst, key = min(ratios)
            lines.append(f"  1 -> 2 threads from 16 MiB (out=): worst {worst:.2f} "
                         f"{shape_label(key[0])} {key[1]} {key[2]}, median "
                         f"{statistics.median(v for v, _ in ratios):.2f} (target >= "
                         f"{SCALING_TARGET}, {_verdict(worst >= SCALING_TARGET)})")
    lines += format_mlp_targets(results, threads)
    tiny = report.get("tiny")
    if tiny and "cpubn.BatchNorm" in tiny["us"] and tiny["dtype"] == "float32":
        us = tiny["us"]["cpubn.BatchNorm"]
        lines.append(f"  bn(x) on (1, 16) float32 eval: {us:.2f} us (target <= {TINY_TARGET_US} "
                     f"us, {_verdict(us <= TINY_TARGET_US)})")
    return "\n".join(lines)


def format_mlp_targets(results, threads):
    """Issue 36's lines over the quiet 2-D cases (none without 2-D cases): per thread
    count and op, the median ratio to torch and the cases below MLP_CASE_TARGET; then the
    1 -> 2 thread scaling of train and backward from MLP_SCALING_ELEMENTS."""
    flat = [r for r in results if len(r["shape"]) == 2]
    if not flat:
        return []
    lines = ["  2-D (batch, features) against torch (allocating):"]
    for n in threads:
        for op in OPS:
            cases = [r for r in flat if r["threads"] == n and r["op"] == op
                     and r.get("speedup_vs_torch")]
            if not cases:
                continue
            med = statistics.median(r["speedup_vs_torch"] for r in cases)
            below = [r for r in cases if r["speedup_vs_torch"] < MLP_CASE_TARGET]
            names = ", ".join(f"{shape_label(r['shape'])} {r['speedup_vs_torch']:.2f}x"
                              for r in below)
            lines.append(f"    {n} thread{'s' if n > 1 else ' '} {op:<8} median "
                         f"{med:.2f}x (target >= {MLP_MEDIAN_TARGET}, "
                         f"{_verdict(med >= MLP_MEDIAN_TARGET)}); "
                         f"{len(cases) - len(below)} of {len(cases)} cases >= "
                         f"{MLP_CASE_TARGET}x ({_verdict(not below)})"
                         + (f"; below: {names}" if below else ""))
    if 1 in threads and 2 in threads:
        pairs = {}
        for r in flat:
            if r["op"] in ("train", "backward") and r["threads"] in (1, 2) and (
                    r["shape"][0] * r["shape"][1] >= MLP_SCALING_ELEMENTS):
                pairs.setdefault((tuple(r["shape"]), r["op"]), {})[r["threads"]] = r
        ratios = []
        for (shape, op), per in sorted(pairs.items()):
            a = per.get(1, {}).get("peers", {}).get("cpubn", {}).get("median_ms")
            b = per.get(2, {}).get("peers", {}).get("cpubn", {}).get("median_ms")
            if a and b:
                ratios.append((a / b, shape, op))
        if ratios:
            worst, shape, op = min(ratios)
            lines.append(f"    1 -> 2 threads, train and backward from 4M elements: worst "
                         f"{worst:.2f} {shape_label(shape)} {op}, median "
                         f"{statistics.median(v for v, _, _ in ratios):.2f} (target >= "
                         f"{MLP_SCALING_TARGET}, {_verdict(worst >= MLP_SCALING_TARGET)})")
    return lines


LEGEND = """\
Times in ms, medians. roof: minimum traffic (forward 2x size, backward 3x size)
at the large-buffer copy bandwidth above. copy: parallel copy of the same input
into a buffer of its own (cache effects included). out=: cpubn writing into a
preallocated buffer; cpubn: cpubn allocating its output, as NumPy and torch do.
GB/s and xroof: minimum traffic / time, time / roof. xcopy: out= / copy. alloc/out:
cpubn / out=. ort: onnxruntime (eval, nchw). vs: peer time / cpubn time (allocating);
torch*: backward's faster layout was PyTorch's other memory format;
busy: the machine was busy during the case (the copy's median 1.5x its best repeat, or
a peer's repeats spread 3x): no ratio is given, and the summary leaves it out.
NumPy runs on one thread; torch for nhwc is channels_last. ERR: the peer raised;
'!': cpubn's result disagrees with NumPy's (details in the JSON)."""
