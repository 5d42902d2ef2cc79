"""Writes OUT_DIR/report.md of scripts/gpu_check.sh from the raw files its stages left there:
stages.tsv (stage, status, seconds, limit, note), info.txt, junit-*.xml / pytest-*.log,
sanitizer-*.log, bench-*.json. Standard library only (it runs on the GPU image's python3).

    python3 scripts/gpu_check_report.py OUT_DIR
"""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

# the Active optimizers whose step time the report checks against their byte floor (the bytes a
# step moves over its torch counterpart's, in each benchmark row: full and compact state differ)
FLOOR_CHECKED = ("ActiveAdamW", "ActiveSGD")
# tests whose outcome the report lists by name: (label, pattern on the test id)
GRAPHS = r"test_cuda_graphs_replay_every_boundary_kind"
KEY_CHECKS = [
    ("CUDA graphs, every boundary kind (cuda backend)", GRAPHS + r"\[cuda\]"),
    ("CUDA graphs, every boundary kind (triton backend)", GRAPHS + r"\[triton\]"),
    ("no host sync per step (cuda backend)", r"test_steps_never_sync_with_the_host"),
    ("no host sync per step (triton backend)", r"test_cuda_step_never_syncs_with_the_host"),
    ("cuda and triton available on the device", r"test_the_fused_backends_run_on_cuda"),
    ("cuda bit-identical to the cpu backend", r"test_bit_identical_to_the_cpu_backend"),
    ("tensor beyond 2^31 elements (cuda)", r"test_a_tensor_beyond_2_31_elements"),
    ("tensor beyond 2^31 elements (triton)", r"test_cuda_tensor_beyond_2_31_elements"),
]


def read_stages(out: Path) -> list[list[str]]:
    path = out / "stages.tsv"
    if not path.exists():
        return []
    return [line.split("\t") for line in path.read_text().splitlines() if line.strip()]


def junit_cases(path: Path) -> list[dict]:
    """Every test case of a junit XML: id, outcome (passed/failed/error/skipped), message."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = {"failure": "failed"}.get(kind, kind)
                message = (node.get("message") or "").splitlines()[0][:200] if node.get(
                    "message") else ""
                break
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        cases.append({"id": name, "outcome": outcome, "message": message})
    return cases


def last_started_test(log: Path) -> str | None:
    """The test a shard was running when it was stopped (conftest prints each one it starts)."""
    text = log.read_text(errors="replace")
    started = re.findall(r"\[per-test timeout [^\]]*\] running (\S+)", text)
    return started[-1] if started else None


def tests_section(out: Path) -> list[str]:
    lines = ["## Tests on the device", "",
             "| shard | passed | failed | errors | skipped | note |", "|---|---|---|---|---|---|"]
    all_cases = []
    for log in sorted(out.glob("pytest-*.log")):
        shard = log.stem.removeprefix("pytest-")
        xml = out / f"junit-{shard}.xml"
        if not xml.exists():
            running = last_started_test(log)
            note = "no junit XML: the shard was stopped" + (f" while running `{running}`"
                                                            if running else "")
            lines.append(f"| {shard} | | | | | {note} (see {log.name}) |")
            continue
        cases = junit_cases(xml)
        all_cases += cases
        counts = {k: sum(c["outcome"] == k for c in cases)
                  for k in ("passed", "failed", "error", "skipped")}
        lines.append(f"| {shard} | {counts['passed']} | {counts['failed']} | {counts['error']} "
                     f"| {counts['skipped']} | {xml.name} |")
    failures = [c for c in all_cases if c["outcome"] in ("failed", "error")]
    lines += ["", f"Failures: {len(failures)}"]
    lines += [f"- `{c['id']}`: {c['message']}" for c in failures]
    # on a GPU machine a skipped cuda test means something is missing there: say what
    reasons = Counter(c["message"] for c in all_cases if c["outcome"] == "skipped")
    lines += ["", f"Skip reasons: {len(reasons)}"]
    lines += [f"- {count} × {reason}" for reason, count in reasons.most_common()]
    lines += ["", "Key checks:", ""]
    for label, pattern in KEY_CHECKS:
        matched = [c for c in all_cases if re.search(pattern, c["id"])]
        if not matched:
            lines.append(f"- {label}: not run")
            continue
        outcomes = sorted({c["outcome"] for c in matched})
        lines.append(f"- {label}: {', '.join(outcomes)} ({len(matched)} test(s))")
    return lines


def sanitizer_section(out: Path) -> list[str]:
    lines = ["## compute-sanitizer", ""]
    note = out / "sanitizer-status.txt"
    lines.append(note.read_text().strip() if note.exists() else "Not run (see the stage table).")
    for log in sorted(out.glob("sanitizer-*.log")):
        text = log.read_text(errors="replace")
        summary = re.findall(r"ERROR SUMMARY: (\d+) error", text)
        result = f"{summary[-1]} errors" if summary else "no ERROR SUMMARY line (stopped?)"
        lines.append(f"- {log.stem.removeprefix('sanitizer-')}: {result} ({log.name})")
    return lines


def bench_section(out: Path) -> list[str]:
    lines = ["## Step time", ""]
    paths = sorted(out.glob("bench-*.json"))
    if not paths:
        return lines + ["No bench-*.json: the benchmark stage did not finish a run."]
    for path in paths:
        result = json.loads(path.read_text())
        lines += [f"{path.name}: {result['ceiling']}: {result['ceiling_gb_per_s']:.1f} GB/s "
                  "(measured in the same run)", "",
                  "| case | optimizer | median ms | GB/s | % of ceiling | vs torch fused "
                  "| byte floor | ≤ 1.1 × floor |", "|---|---|---|---|---|---|---|---|"]
        for row in result["rows"]:
            if row["optimizer"].split()[0] not in FLOOR_CHECKED or row["byte_floor"] is None:
                continue
            floor = row["byte_floor"]
            case = f"{row['size']} / {row['tensors']} tensors / {row['dtype']}"
            ok = "yes" if row["ratio_to_baseline"] <= 1.1 * floor else "no"
            lines.append(
                f"| {case} | {row['optimizer']} | {row['median_ms']:.3f} | {row['gb_per_s']:.0f} "
                f"| {100 * row['fraction_of_ceiling']:.0f}% | {row['ratio_to_baseline']:.2f}× "
                f"{row['baseline']} | {floor:.2f}× | {ok} |")
        lines.append("")
    return lines + ["Every optimizer and backend: the bench-*.md tables beside their JSON."]


def report(out: Path) -> str:
    lines = ["# GPU check", ""]
    info = out / "info.txt"
    if info.exists():
        lines += ["```", info.read_text().strip(), "```", ""]
    lines += ["| stage | status | seconds | limit (s) | note |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(row + [''] * (5 - len(row)))} |" for row in read_stages(out)]
    for section in (tests_section, sanitizer_section, bench_section):
        lines += [""] + section(out)
    files = sorted(p.name for p in out.iterdir() if p.name != "report.md")
    lines += ["", "## Raw files", "", ", ".join(files)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    (out_dir / "report.md").write_text(report(out_dir))
