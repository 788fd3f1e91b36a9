"""Readable pictures of the workflow's plan, from Snakemake's own output.

Snakemake 9.27.1 offers ``--dag`` and ``--rulegraph`` (Graphviz DOT), ``--d3dag`` (JSON) and
``--mermaid-js``. Their job labels carry only the wildcards a job adds to its dependencies (a
``finetune`` box shows none: train and the cell-type stats already name round, model and cell
type), and ``--d3dag`` none at all. So every picture here joins two outputs of the same plan:

- the edges and job ids of ``snakemake --dag`` (every job of the DAG, finished ones included), and
- the rule and full wildcards of each job id from the dry run ``snakemake -n`` (jobs to run).

Job ids are Snakemake's build order, the same in both runs of the same plan; the join checks that
each job's rule and its DOT-label wildcards agree with the dry run and refuses otherwise.

- ``dag-rules``: the rule graph (``--rulegraph``) with each rule's job count in its box.
- ``dag-slice``: the job DAG of one round / model / cell type, every box naming all its wildcards.
- ``dag-html``: one self-contained HTML page of the whole plan (the vendored Cytoscape.js inline):
  zoom, search, groups by round and stage that collapse; dependencies from many jobs of one group
  to one job are drawn as one edge from the group.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from deepnoise.atomic import atomic_path
from deepnoise.errors import InputError

VENDOR = Path(__file__).parent / "vendor"
CYTOSCAPE = VENDOR / "cytoscape-3.34.4.min.js"
CYTOSCAPE_VERSION = "3.34.4"
TEMPLATE = Path(__file__).with_name("dag_page.html")

_NODE = re.compile(r'^\s*(\d+)\[label = "((?:[^"\\]|\\.)*)"(.*)\];\s*$', re.M)
_EDGE = re.compile(r"^\s*(\d+) -> (\d+)\s*$", re.M)
_STYLE = re.compile(r'style="([^"]*)"')
_BLOCK = re.compile(r"^(?:local)?rule (\w+):\n((?:    .*\n?)*)", re.M)
_FIELD = re.compile(r"^    (\w+): (.*)$", re.M)
# the order wildcards are shown in; others follow alphabetically
WILDCARD_ORDER = ("round", "model", "cell_type", "experiment", "plate", "kind")


@dataclass
class Job:
    jobid: int
    rule: str
    wildcards: dict[str, str] = field(default_factory=dict)
    planned: bool = True  # in the dry run (False: finished, drawn dashed by snakemake)

    def label(self, sep: str = "\n") -> str:
        return sep.join([self.rule, *(f"{k}={v}" for k, v in sorted_wildcards(self.wildcards))])

    @property
    def group(self) -> str:
        r = self.wildcards.get("round")
        return f"round {r} · {self.rule}" if r is not None else self.rule


@dataclass
class Plan:
    jobs: dict[int, Job]
    edges: list[tuple[int, int]]  # (dependency, job)

    def counts(self) -> Counter:
        return Counter(j.rule for j in self.jobs.values())


def sorted_wildcards(wc: dict[str, str]) -> list[tuple[str, str]]:
    rank = {k: i for i, k in enumerate(WILDCARD_ORDER)}
    return sorted(wc.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))


def _read(path: str | os.PathLike) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc})") from exc


def parse_dot(text: str, source: str = "DOT") -> tuple[dict[int, tuple[str, dict[str, str], str]], list]:
    """Nodes ``{id: (rule, label wildcards, style)}`` and edges ``[(from, to)]`` of Snakemake DOT."""
    nodes = {}
    for nid, label, rest in _NODE.findall(text):
        rule, *lines = label.split("\\n")
        # snakemake writes "key: value", the pictures here "key=value"
        wc = dict(re.split(r": |=", line, maxsplit=1) for line in lines if re.search(r": |=", line))
        style = _STYLE.search(rest)
        nodes[int(nid)] = (rule, wc, style.group(1) if style else "rounded")
    if not nodes:
        raise InputError(f"{source}: no nodes (not the output of snakemake --dag/--rulegraph?)")
    edges = [(int(a), int(b)) for a, b in _EDGE.findall(text)]
    for a, b in edges:
        if a not in nodes or b not in nodes:
            raise InputError(f"{source}: edge {a} -> {b} names an undeclared node")
    return nodes, edges


def parse_dry_run(text: str, source: str = "dry run") -> dict[int, tuple[str, dict[str, str]]]:
    """``{jobid: (rule, wildcards)}`` of the jobs a ``snakemake -n`` output lists."""
    jobs = {}
    for rule, body in _BLOCK.findall(text):
        fields = dict(_FIELD.findall(body))
        if "jobid" not in fields:
            raise InputError(f"{source}: rule {rule} block without a jobid")
        wc = dict(kv.split("=", 1) for kv in fields.get("wildcards", "").split(", ") if "=" in kv)
        jobs[int(fields["jobid"])] = (rule, wc)
    total = re.search(r"^total\s+(\d+)\s*$", text, re.M)
    if total and int(total.group(1)) != len(jobs):
        raise InputError(f"{source}: the job stats say {total.group(1)} jobs, the listing has {len(jobs)}")
    return jobs


def join(dot_text: str, dry_text: str, dot_source: str = "DOT", dry_source: str = "dry run") -> Plan:
    """One plan from ``snakemake --dag`` and ``snakemake -n`` of the same targets and config."""
    nodes, edges = parse_dot(dot_text, dot_source)
    dry = parse_dry_run(dry_text, dry_source)
    jobs = {}
    for nid, (rule, wc, style) in nodes.items():
        if nid in dry:
            drule, dwc = dry[nid]
            if drule != rule or any(dwc.get(k) != v for k, v in wc.items()):
                raise InputError(
                    f"{dot_source} job {nid} is {rule} {wc} but {dry_source} job {nid} is {drule} {dwc}: "
                    "the two come from different plans (same targets, config and --forceall for both)"
                )
            jobs[nid] = Job(nid, rule, dwc, planned=True)
        else:
            jobs[nid] = Job(nid, rule, wc, planned="dashed" not in style)
    missing = sorted(set(dry) - set(nodes))
    if missing:
        raise InputError(f"{dry_source} lists jobs {missing[:5]} that {dot_source} lacks: different plans")
    return Plan(jobs, edges)


def load_plan(dot: str | os.PathLike, dry_run: str | os.PathLike) -> Plan:
    return join(_read(dot), _read(dry_run), str(dot), str(dry_run))


# ---------------------------------------------------------------- DOT pictures


def _dot_header(name: str) -> list[str]:
    return [
        f"digraph {name} {{",
        "    graph[bgcolor=white, margin=0, rankdir=TB];",
        "    node[shape=box, style=rounded, fontname=sans, fontsize=10, penwidth=2];",
        "    edge[penwidth=1.5, color=grey];",
    ]


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def rulegraph_with_counts(rulegraph_text: str, counts: Counter, source: str = "rulegraph") -> str:
    """The ``--rulegraph`` DOT with ``N jobs`` under each rule name."""
    nodes, _ = parse_dot(rulegraph_text, source)
    unknown = sorted({r for r, _, _ in nodes.values()} - set(counts))
    if unknown:
        raise InputError(f"{source}: rules {unknown} have no jobs in the plan")

    def relabel(m: re.Match) -> str:
        rule = m.group(2).split("\\n")[0]
        n = counts[rule]
        return f'{m.group(1)}[label = "{rule}\\n{n} job{"s" if n != 1 else ""}"{m.group(3)}];'

    return re.sub(r'^(\s*\d+)\[label = "((?:[^"\\]|\\.)*)"(.*)\];\s*$', relabel, rulegraph_text, flags=re.M)


def slice_jobs(plan: Plan, **filters: str | None) -> set[int]:
    """Jobs whose wildcards agree with every given filter they name, among those naming at least one
    (``round=1, model=r10`` keeps train r10 round 1, its finetunes and predicts, round 1's ensembles,
    balances, metrics and pseudo labels, and leaves out the stacks and stats)."""
    active = {k: str(v) for k, v in filters.items() if v is not None}
    if not active:
        raise InputError("dag-slice: give at least one of --round, --model, --cell-type")
    keep = set()
    for nid, job in plan.jobs.items():
        named = [k for k in active if k in job.wildcards]
        if named and all(job.wildcards[k] == active[k] for k in named):
            keep.add(nid)
    if not keep:
        seen = defaultdict(set)
        for job in plan.jobs.values():
            for k in active:
                if k in job.wildcards:
                    seen[k].add(job.wildcards[k])
        raise InputError(
            "dag-slice: no job matches "
            + ", ".join(f"{k}={v} (plan has {sorted(seen[k])})" for k, v in active.items())
        )
    return keep


def slice_dot(plan: Plan, keep: set[int]) -> str:
    """DOT of the jobs ``keep`` with their full wildcards; dependencies from outside the slice are
    summarised per rule as one grey box (``stack ×204``)."""
    out = _dot_header("snakemake_slice")
    rules = sorted({j.rule for j in plan.jobs.values()})
    hue = {r: f"{i * 2 / (3 * len(rules)):.2f} 0.6 0.85" for i, r in enumerate(rules)}
    for nid in sorted(keep):
        job = plan.jobs[nid]
        style = "rounded" if job.planned else "rounded,dashed"
        out.append(f'    {nid}[label = "{_esc(job.label())}", color = "{hue[job.rule]}", style="{style}"];')
    outside: dict[str, set[int]] = defaultdict(set)  # rule -> external jobs feeding the slice
    ext_edges: set[tuple[str, int]] = set()
    for a, b in plan.edges:
        if b in keep and a not in keep:
            rule = plan.jobs[a].rule
            outside[rule].add(a)
            ext_edges.add((rule, b))
        elif a in keep and b in keep:
            out.append(f"    {a} -> {b}")
    for rule, members in sorted(outside.items()):
        n = len(members)
        label = plan.jobs[next(iter(members))].label() if n == 1 else f"{rule} ×{n}\n(outside the slice)"
        style = 'color = "grey", style="rounded,dotted"'
        out.append(f'    "ext_{rule}"[label = "{_esc(label)}", {style}];')
    for rule, b in sorted(ext_edges):
        out.append(f'    "ext_{rule}" -> {b} [style=dotted]')
    out.append("}")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- HTML page

COLLAPSED_OVER = 50  # groups with more jobs start collapsed (the header still counts every job)
NODE_W, NODE_H, GAP_X, GAP_Y, GROUP_GAP, COL_GAP, BAND_GAP = 150, 46, 14, 10, 90, 420, 160


def _layers(plan: Plan) -> dict[str, int]:
    """Longest-path layer of each group in the group graph (groups: rule x round, acyclic)."""
    group_of = {nid: j.group for nid, j in plan.jobs.items()}
    succ: dict[str, set[str]] = defaultdict(set)
    indeg: Counter = Counter({g: 0 for g in group_of.values()})
    for a, b in plan.edges:
        ga, gb = group_of[a], group_of[b]
        if ga != gb and gb not in succ[ga]:
            succ[ga].add(gb)
            indeg[gb] += 1
    layer = {g: 0 for g in indeg}
    ready = sorted(g for g, d in indeg.items() if d == 0)
    seen = 0
    while ready:
        g = ready.pop()
        seen += 1
        for h in sorted(succ[g]):
            layer[h] = max(layer[h], layer[g] + 1)
            indeg[h] -= 1
            if indeg[h] == 0:
                ready.append(h)
    if seen != len(layer):
        raise InputError("the group graph (rule x round) has a cycle")
    return layer


def layout(plan: Plan) -> tuple[list[dict], list[dict]]:
    """Preset positions. Bands top to bottom: the groups before the first round, one band per round,
    the groups after the last round; in a band one column per layer (longest path), the groups of a
    column stacked, a group's jobs in a grid."""
    layer = _layers(plan)
    members: dict[str, list[Job]] = defaultdict(list)
    for job in plan.jobs.values():
        members[job.group].append(job)
    round_of = {g: js[0].wildcards.get("round") for g, js in members.items()}
    round_layers = [layer[g] for g, r in round_of.items() if r is not None]
    first = min(round_layers, default=0)

    def band(g: str) -> tuple[int, int]:
        r = round_of[g]
        if r is not None:
            return (1, int(r)) if r.isdigit() else (1, 0)
        return (0, 0) if layer[g] < first else (2, 0)

    bands: dict[tuple, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for g in sorted(layer, key=lambda g: (layer[g], g)):
        bands[band(g)][layer[g]].append(g)
    groups, jobs = [], []
    y_band = 0.0
    for b in sorted(bands):
        x0, height = 0.0, 0.0
        for col in sorted(bands[b]):
            y0, width = y_band, 0.0
            for g in bands[b][col]:
                js = sorted(
                    members[g], key=lambda j: [v for _, v in sorted_wildcards(j.wildcards)] + [j.jobid]
                )
                rows = max(6, math.ceil(math.sqrt(len(js) * 2)))  # a squarish grid, taller than wide
                ncols, nrows = math.ceil(len(js) / rows), min(len(js), rows)
                for i, j in enumerate(js):
                    jobs.append(
                        {
                            "id": j.jobid,
                            "rule": j.rule,
                            "group": g,
                            "label": j.label(),
                            "wc": dict(sorted_wildcards(j.wildcards)),
                            "planned": j.planned,
                            "x": x0 + (i // rows) * (NODE_W + GAP_X),
                            "y": y0 + (i % rows) * (NODE_H + GAP_Y),
                        }
                    )
                groups.append({"id": g, "n": len(js), "round": round_of[g], "rule": js[0].rule})
                y0 += nrows * (NODE_H + GAP_Y) + GROUP_GAP
                width = max(width, ncols * (NODE_W + GAP_X))
            x0 += width + COL_GAP
            height = max(height, y0 - y_band)
        y_band += height + BAND_GAP
    return groups, jobs


def html_page(plan: Plan, title: str, js: str | os.PathLike = CYTOSCAPE) -> str:
    try:
        library = Path(js).read_text()
    except OSError as exc:
        raise InputError(f"{js}: cannot read the vendored Cytoscape.js ({exc})") from exc
    groups, jobs = layout(plan)
    index = {j["id"]: i for i, j in enumerate(jobs)}
    data = {
        "title": title,
        "groups": groups,
        "jobs": jobs,
        "edges": [[index[a], index[b]] for a, b in plan.edges],
        "collapsed_over": COLLAPSED_OVER,
    }
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    page = TEMPLATE.read_text().replace("__TITLE__", html.escape(title))
    page = page.replace("__CYTOSCAPE_VERSION__", CYTOSCAPE_VERSION).replace(
        "__COLLAPSED_OVER__", str(COLLAPSED_OVER)
    )
    page = page.replace("__LIBRARY__", library.replace("</script", "<\\/script"))
    return page.replace("__DATA__", payload)


def _write(out: str | os.PathLike, text: str) -> None:
    with atomic_path(out) as tmp:
        Path(tmp).write_text(text)


def _run_html(args: argparse.Namespace) -> int:
    plan = load_plan(args.dot, args.dry_run)
    _write(args.out, html_page(plan, args.title or f"Job DAG: {len(plan.jobs)} jobs"))
    print(f"{args.out}: {len(plan.jobs)} jobs, {len(plan.edges)} dependencies")
    return 0


def _run_rules(args: argparse.Namespace) -> int:
    plan = load_plan(args.dot, args.dry_run)
    _write(args.out, rulegraph_with_counts(_read(args.rulegraph), plan.counts(), str(args.rulegraph)))
    return 0


def _run_slice(args: argparse.Namespace) -> int:
    plan = load_plan(args.dot, args.dry_run)
    keep = slice_jobs(plan, round=args.round, model=args.model, cell_type=args.cell_type)
    _write(args.out, slice_dot(plan, keep))
    print(f"{args.out}: {len(keep)} of {len(plan.jobs)} jobs")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    def common(p):
        p.add_argument("--dot", required=True, help="output of snakemake --dag")
        p.add_argument("--dry-run", required=True, help="output of snakemake -n (same targets and config)")
        p.add_argument("--out", required=True)

    p = subparsers.add_parser("dag-html", help="the whole job DAG as one self-contained HTML page")
    common(p)
    p.add_argument("--title", help="page title")
    p.set_defaults(func=_run_html)

    p = subparsers.add_parser("dag-rules", help="the rule graph (DOT) with each rule's job count")
    common(p)
    p.add_argument("--rulegraph", required=True, help="output of snakemake --rulegraph")
    p.set_defaults(func=_run_rules)

    p = subparsers.add_parser("dag-slice", help="the job DAG (DOT) of one round / model / cell type")
    common(p)
    p.add_argument("--round")
    p.add_argument("--model")
    p.add_argument("--cell-type")
    p.set_defaults(func=_run_slice)
