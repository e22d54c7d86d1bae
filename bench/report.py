"""Turns a pytest-benchmark JSON run into the markdown of bench/RESULTS.md.

    python bench/report.py RUN.json [RUN2.json ...] [--title T ...] [--preamble FILE] [--include TITLE=FILE ...]
        [--out bench/RESULTS.md]

Every number in the output comes from the run. Each benchmark carries in extra_info its
implementation name ("impl") and the group's baseline ("baseline"); a benchmark may also declare
targets: extra_info["targets"] = [{"vs": impl, "max_ratio": r}, ...] (time ratio to the other
implementation's median in the same group), which the report marks met or missed. A group whose
benchmarks name a metric (extra_info["metric"] = a key of extra_info, e.g. "peak_mib") is compared on
that value instead of the time. --figure adds a link to an image (e.g. bench/plot.py's PNG).
"""
import argparse
import datetime
import json
import os
from collections import defaultdict


def _fmt_time(seconds):
    for unit, scale in (("s", 1.0), ("ms", 1e3), ("us", 1e6)):
        if seconds * scale >= 1.0 or unit == "us":
            return f"{seconds * scale:.3g} {unit}"


def _value(bench):
    """What the group compares: extra_info[metric] when the benchmark names one, else the median time."""
    metric = bench["extra_info"].get("metric")
    return bench["extra_info"][metric] if metric else bench["stats"]["median"]


def render(run, title, figures=()):
    machine = run.get("machine_info", {})
    cpu = machine.get("cpu", {}).get("brand_raw", "unknown CPU")
    stamp = run.get("datetime", datetime.datetime.now(datetime.timezone.utc).isoformat())[:19].replace("T", " ")
    groups = defaultdict(list)
    for bench in run["benchmarks"]:
        groups[bench["group"] or bench["name"]].append(bench)

    lines = [f"## {title}", "", f"Run {stamp} UTC on {cpu} ({machine.get('system', '')} "
             f"{machine.get('release', '')}), Python {machine.get('python_version', '')}.", ""]
    target_lines = []
    for group in sorted(groups):
        benches = groups[group]
        values = {b["extra_info"].get("impl", b["name"]): _value(b) for b in benches}
        baseline = benches[0]["extra_info"].get("baseline")
        metric = benches[0]["extra_info"].get("metric")
        header = f"| implementation | {metric} | median time | IQR | rounds | vs {baseline} |" if metric else \
            f"| implementation | median | IQR | rounds | vs {baseline} |"
        lines += [f"### {group}", "", header, "|---|---|---|---|---|" + ("---|" if metric else "")]
        for b in sorted(benches, key=_value):
            impl = b["extra_info"].get("impl", b["name"])
            ratio = f"{_value(b) / values[baseline]:.3f}x" if baseline in values else "-"
            shown = f"{_value(b)} | " if metric else ""
            lines.append(f"| {impl} | {shown}{_fmt_time(b['stats']['median'])} | {_fmt_time(b['stats']['iqr'])} | "
                         f"{b['stats']['rounds']} | {ratio} |")
            for target in b["extra_info"].get("targets", []):
                if target["vs"] not in values:
                    continue
                ratio_t = _value(b) / values[target["vs"]]
                verdict = "met" if ratio_t <= target["max_ratio"] else "MISSED"
                target_lines.append(f"- {group}: {impl} / {target['vs']} = {ratio_t:.3f} "
                                    f"(target <= {target['max_ratio']}): {verdict}")
        lines.append("")
    if target_lines:
        lines += ["### Targets", ""] + target_lines + [""]
    for figure in figures:
        lines += [f"![{os.path.basename(figure)}]({figure})", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json outputs, one section each")
    parser.add_argument("--title", action="append", default=[], help="a section title per JSON file")
    parser.add_argument("--preamble", help="a markdown file placed before the sections")
    parser.add_argument("--out", help="write here instead of printing")
    parser.add_argument("--figure", action="append", default=[],
                        help="link this image (path as written in the report) after the last section")
    parser.add_argument("--include", action="append", default=[], metavar="TITLE=FILE",
                        help="a section made of a markdown file another script wrote, after the benchmark sections")
    args = parser.parse_args()
    titles = args.title + [f"Benchmarks {i + 1}" for i in range(len(args.title), len(args.json))]
    parts = []
    if args.preamble:
        with open(args.preamble) as f:
            parts.append(f.read().rstrip() + "\n")
    for i, (path, title) in enumerate(zip(args.json, titles)):
        with open(path) as f:
            parts.append(render(json.load(f), title, args.figure if i == len(args.json) - 1 else ()))
    for item in args.include:
        title, _, path = item.partition("=")
        with open(path) as f:
            parts.append(f"## {title}\n\n{f.read().rstrip()}\n")
    text = "\n".join(parts)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.out)
    else:
        print(text)


if __name__ == "__main__":
    main()
