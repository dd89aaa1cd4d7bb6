"""Report: the issue's targets judged from a run's figures, and its Markdown (the tables of
bench/RESULTS.md, each section between its markers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MB = 1 << 20
SMALL = 64 << 10  # the "small calls" target applies up to here
LARGE = 64 * MB  # the "large tensors" target applies from here


def ms_text(cell: dict[str, Any] | None, key: str = "p50") -> str:
    if not cell:
        return "–"
    if "error" in cell:
        return "error"
    return f"{cell[key] * 1e3:.2f}"


def size_text(n: int) -> str:
    return f"{n >> 20} MB" if n >= MB else f"{n >> 10} KB"


def best_remote(row: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    cells = [
        (t, row[t])
        for t in ("auto", "chunked", "unary")
        if isinstance(row.get(t), dict) and "p50" in row[t]
    ]
    return min(cells, key=lambda c: c[1]["p50"]) if cells else None


# Issue 14's small-call targets over TCP (the Unix-socket one is bench/colocated.py's).
SMALL_CALL_TARGET = 1.5  # x (echo + local), calls <= 64 KB
THROUGHPUT_TARGET = 0.5  # x a trivial handler's requests/s, 4 client processes


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured figure (ratios from this run)."""
    out = []
    for row in result.get("rows", []):
        if "p50" not in row.get("local", {}) or "p50" not in row.get("echo", {}):
            continue  # a failed floor or local column: reported in the table, no ratio to judge
        local = row["local"]["p50"]
        name = f"{row['loss']} {size_text(row['size'])}"
        if row["size"] <= SMALL and "p50" in row.get("unary", {}):
            ratio = row["unary"]["p50"] / (row["echo"]["p50"] + local)
            out.append(
                {
                    "target": f"{name} unary <= {SMALL_CALL_TARGET} x (echo + local)",
                    "value": ratio,
                    "met": ratio <= SMALL_CALL_TARGET,
                    "group": "small calls over TCP",
                }
            )
        if row["size"] >= LARGE:
            best = best_remote(row)
            if best:
                ratio = best[1]["p50"] / row["echo"]["p50"]
                transport_only = max(0.0, best[1]["p50"] - local) / row["echo"]["p50"]
                out.append(
                    {
                        "target": f"{name} {best[0]} <= 0.5 x echo (transport alone, lossd - local: {transport_only:.2f} x echo)",
                        "value": ratio,
                        "met": ratio <= 0.5,
                    }
                )
    for transport, cell in (result.get("throughput") or {}).items():
        ratio = cell["lossd_rps"] / cell["floor_rps"]
        out.append(
            {
                "target": f"throughput {result['config']['clients']} clients ({transport}) >= {THROUGHPUT_TARGET} x trivial handler",
                "value": ratio,
                "met": ratio >= THROUGHPUT_TARGET,
                "group": "throughput",
            }
        )
    mem = result.get("memory") or {}
    if "peak" in mem:
        r = mem["peak"]["ratio"]
        out.append(
            {
                "target": f"peak RSS raise for one {mem['peak']['request_bytes'] >> 20} MB request <= 3x",
                "value": r,
                "met": r <= 3,
            }
        )
        out.append(
            {
                "target": f"peak RSS raise for one {mem['peak']['request_bytes'] >> 20} MB request stays <= 4.2x (issue 14)",
                "value": r,
                "met": r <= 4.2,
                "group": "peak RSS",
            }
        )
    if "colocated_peak" in mem:
        from .colocated import memory_target

        out.append(memory_target(mem["colocated_peak"]))
    if "drift" in mem:
        r = mem["drift"]["ratio"]
        out.append(
            {
                "target": f"RSS drift over {mem['drift']['calls']} calls < 5 %",
                "value": r,
                "met": r < 0.05,
            }
        )
    return out


def table(result: dict[str, Any]) -> str:
    cols = [
        "loss",
        "payload",
        "input",
        "req MB",
        "echo p50/p99",
        "pingpong p50",
        "local p50",
        "unary p50/p99",
        "chunked p50/p99",
        "auto p50/p99",
        "best/floor",
        "MB/s",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in result["rows"]:

        def both(key: str, row: dict = row) -> str:
            cell = row.get(key)
            return (
                f"{ms_text(cell)} / {ms_text(cell, 'p99')}"
                if cell and "p50" in cell
                else ms_text(cell)
            )

        best = best_remote(row)
        if best is None or "p50" not in row.get("local", {}) or "p50" not in row.get("echo", {}):
            ratio = mbs = "–"
        else:
            floor = (
                row["echo"]["p50"] + row["local"]["p50"]
                if row["size"] < LARGE
                else row["echo"]["p50"]
            )
            ratio = f"{best[1]['p50'] / floor:.2f} ({best[0]})"
            mbs = f"{(row['request_bytes'] + row['grad_bytes']) / best[1]['p50'] / MB:.0f}"
        lines.append(
            "| "
            + " | ".join(
                [
                    row["loss"],
                    size_text(row["size"]),
                    row["shape"],
                    f"{row['request_bytes'] / MB:.3f}",
                    both("echo"),
                    ms_text(row.get("pingpong")),
                    ms_text(row.get("local")),
                    both("unary"),
                    both("chunked"),
                    both("auto"),
                    ratio,
                    mbs,
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def render_machine(result: dict[str, Any]) -> str:
    m = result["machine"]
    return (
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['platform']}; Python {m['python']}, "
        f"torch {m['torch']}, grpcio {m['grpcio']}, protobuf {m['protobuf']}; server device {m['device']}"
        + (f" ({m['gpu']})" if "gpu" in m else "")
        + f". Load average at the start: {m.get('load', '?')}."
    )


def render_targets(items: list[dict[str, Any]]) -> list[str]:
    if not items:
        return []
    parts = ["\nTargets:\n", "| target | measured | met |\n|---|---|---|"]
    for t in items:
        parts.append(f"| {t['target']} | {t['value']:.2f} | {'yes' if t['met'] else '**no**'} |")
    return parts


# Issue 14's targets by group, in the issue's order, each with how its figure reads.
SUMMARY_GROUPS = {
    "co-located large calls": "shared memory / local compute, cross_entropy fwd+bwd, <= 1.3",
    "network path": "MB/s of request + gradient, 64 MB and larger, >= 1,000",
    "small calls over TCP": "unary / (echo + local), <= 64 KB, <= 1.5",
    "small calls over a Unix socket": "unix / (unix echo + local), <= 64 KB, <= 1.2",
    "throughput": "lossd / trivial handler requests/s, 4 client processes, >= 0.5",
    "peak RSS": "peak RSS raise / request bytes: <= 4.2 (network), <= 3.2 (co-located)",
    "per-call CPU halved": "own CPU per small call / the same at 901838b, each side, <= 0.5",
}


def render_summary(result: dict[str, Any]) -> str:
    """Issue 14's targets of this run in one table: per group, how many rows met it and the
    range of the figures (each section below lists its rows)."""
    lines = [
        f"`{result['command']}` ({result['started']}). " + render_machine(result),
        "",
        "| target | figure | rows met | measured (lowest - highest) |",
        "|---|---|---|---|",
    ]
    for group, figure in SUMMARY_GROUPS.items():
        found = [t for t in result.get("targets", []) if t.get("group") == group]
        if not found:
            lines.append(f"| {group} | {figure} | not measured in this run | – |")
            continue
        met = sum(t["met"] for t in found)
        values = [t["value"] for t in found]
        spread = (
            f"{min(values):,.2f} - {max(values):,.2f}" if len(values) > 1 else f"{values[0]:,.2f}"
        )
        verdict = f"{met} of {len(found)}" + ("" if met == len(found) else " (**missed**)")
        lines.append(f"| {group} | {figure} | {verdict} | {spread} |")
    return "\n".join(lines)


def render_sections(result: dict[str, Any]) -> dict[str, str]:
    """Markdown per part of the run ("rows", "concurrency", "memory"), each self-contained."""
    head = f"`{result['command']}` ({result['started']}). " + render_machine(result)
    all_targets = targets(result)
    sections = {}
    if "rows" in result:
        parts = [
            head,
            f"Server `--workers {result['config']['workers']}`; times in ms, p50 / p99 (n in the JSON); `local` = the "
            "server's engine (validation + forward + autograd.grad) in the bench process; `best/floor` = best lossd "
            "transport / (echo + local) below 64 MB, / echo from 64 MB; "
            "MB/s = (request + gradient bytes) / best p50.",
            "",
            table(result),
        ]
        parts += [f"\n- {note}" for note in result.get("notes", [])]
        tp = result.get("throughput")
        if tp:
            parts.append(
                f"\nThroughput, {result['config']['clients']} client processes, small cross_entropy calls (16x16 f32 + targets), requests/s:\n"
            )
            parts.append(
                "| transport | trivial handler | lossd | ratio | CPU ms per call, trivial: server / clients | lossd: server / clients |\n"
                "|---|---|---|---|---|---|"
            )
            for transport, cell in tp.items():
                fl, ls = cell.get("floor", {}), cell.get("lossd", {})
                parts.append(
                    f"| {transport} | {cell['floor_rps']:.0f} | {cell['lossd_rps']:.0f} | {cell['lossd_rps'] / cell['floor_rps']:.2f} | "
                    f"{fl.get('server_cpu_ms', 0):.2f} / {fl.get('client_cpu_ms', 0):.2f} | {ls.get('server_cpu_ms', 0):.2f} / {ls.get('client_cpu_ms', 0):.2f} |"
                )
        parts += render_targets(
            [t for t in all_targets if not t["target"].startswith(("peak", "RSS"))]
        )
        sections["rows"] = "\n".join(parts)
    if "concurrency" in result:
        parts = [
            head,
            f"{result['config']['clients']} client processes, each looping `RemoteLoss('cross_entropy', transport='unary')` "
            "forward+backward on 16x16 logits (lossd) or a bare unary echo of the same bytes (trivial handler), "
            f"{result['config']['throughput_seconds']:.0f} s per cell; requests/s:",
            "",
            "| server design | trivial handler | lossd | lossd / trivial | server CPU ms per call: trivial / lossd |",
            "|---|---|---|---|---|",
        ]
        for row in result["concurrency"]:
            fl, ls = row.get("floor_rps"), row.get("lossd_rps")
            ratio = f"{ls / fl:.2f}" if fl and ls else "–"
            cpu = f"{row.get('floor_cpu', {}).get('server_cpu_ms', 0):.2f} / {row.get('lossd_cpu', {}).get('server_cpu_ms', 0):.2f}"
            parts.append(f"| {row['design']} | {fl or 0:.0f} | {ls or 0:.0f} | {ratio} | {cpu} |")
        sections["concurrency"] = "\n".join(parts)
    if "memory" in result:
        mem = result["memory"]
        parts = [head, ""]
        if "peak" in mem:
            p = mem["peak"]
            parts.append(
                f"- one {p['request_bytes'] / MB:.0f} MB cross_entropy request (+ as large a gradient), default transport (chunked data frames, `shm=False`): "
                f"peak RSS rose {p['raise'] / MB:.0f} MB = {p['ratio']:.2f} x the request (RSS before {p['rss_before'] / MB:.0f} MB, "
                f"peak after {p['hwm_after'] / MB:.0f} MB; {p['seconds']:.2f} s end to end)"
            )
        if "drift" in mem:
            d = mem["drift"]
            parts.append(
                f"- {d['calls']} small calls after 500 warm-up calls: RSS {d['rss_before'] / MB:.1f} MB -> {d['rss_after'] / MB:.1f} MB "
                f"({d['ratio'] * 100:+.2f} %; {d['calls'] / d['seconds']:.0f} calls/s from one client)"
            )
        if "local_peak" in mem:
            lp = mem["local_peak"]
            parts.append(
                f"- the same evaluation in a bare process, no server (inputs already in memory): peak RSS rose "
                f"{lp['raise'] / MB:.0f} MB = {lp['ratio']:.2f} x the request. That is torch's own working set for "
                "cross_entropy forward + autograd.grad (log-softmax, the dense gradient of the log-softmax, the input "
                "gradient); the server adds the request buffer (1 x) on top."
            )
        if "colocated_peak" in mem:
            c = mem["colocated_peak"]
            parts.append(
                f"- the same request co-located (Unix socket, shared memory used: {c['shm_used']}): peak RSS rose "
                f"{c['raise'] / MB:.0f} MB = {c['ratio']:.2f} x the request ({c['seconds']:.2f} s end to end). Of it, "
                f"the server's own memory (RssAnon) peaked at +{c['anon_ratio']:.2f} x, torch's working set with no "
                f"request buffer, and the caller's regions mapped into it (RssShmem, the client's pages, not copies) "
                f"at +{c['shmem_ratio']:.2f} x, not at the same time: the server gives back its mapping of the "
                f"input region once the forward is done (server/shm.py, forward_done), and maps the answer region "
                f"when it copies the gradient in."
            )
        parts += render_targets([t for t in all_targets if t["target"].startswith(("peak", "RSS"))])
        sections["memory"] = "\n".join(parts)
    if "huge" in result:
        h = result["huge"]
        sections["huge"] = (
            f"{head}\n\n- one {h['request_bytes'] / MB:.0f} MB `mse` request (prediction + target, float32) through "
            f"`RemoteLoss('mse', shm=False)` with every other client default (transport `auto` -> chunked data frames) and `lossd serve --max-message-mb "
            f"{opts_mb(result)}`: {h['seconds']:.1f} s forward+backward, value bitwise equal to local: "
            f"{h['value_matches_local']}, server peak RSS {h['server_peak'] / MB:.0f} MB"
        )
    return sections


def opts_mb(result: dict[str, Any]) -> int:
    return result["config"].get("max_message_mb", 0)


def write_results(sections: dict[str, str], path: Path) -> None:
    """Replace each measured section of RESULTS.md between its markers, keeping the rest."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    for name, body in sections.items():
        start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
        block = f"{start}\n{body}\n{end}"
        if start in text and end in text:
            text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
        else:
            text = text.rstrip("\n") + f"\n\n## {SECTION_TITLES[name]}\n\n{block}\n"
    path.write_text(text)


SECTION_TITLES = {
    "rows": "Latency and bandwidth",
    "concurrency": "Concurrency: server designs",
    "memory": "Server memory",
    "huge": "A 1 GiB request",
    "colocated": "Co-located: Unix socket and shared memory",
    "cpu": "Per-call CPU of small calls",
    "bulk": "Cross-host bulk path",
    "summary": "Issue 14's targets in this run",
}
