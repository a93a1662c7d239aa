"""Replay every reliability scenario and print one table: scenario, expected, observed, result.

The scenarios are the tests marked `faults` (tests/test_faults_*.py). Each one provokes a
failure a hostile or unlucky user could cause (a corrupted artifact, a path or SQL
injection through config, a killed run, concurrent writers, a late failure, an edited
record) and records what it expected and what it observed. This script runs them through
pytest and prints the table; the last line is one JSON object.

    .venv/bin/python bench/faults.py            # every scenario, the slow ones included
    .venv/bin/python bench/faults.py -k names   # a subset (any pytest -k expression)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def run_scenarios(keyword: str | None) -> tuple[list[dict], int]:
    with tempfile.TemporaryDirectory(prefix="faults-") as scratch:
        report = Path(scratch) / "faults.xml"
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "faults",
            "-p",
            "no:cacheprovider",
            f"--junitxml={report}",
            "-o",
            "junit_family=xunit1",
        ]
        if keyword:
            command += ["-k", keyword]
        completed = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True)
        if not report.exists():
            sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-4000:])
            raise SystemExit(f"pytest wrote no report (exit {completed.returncode})")
        return parse_report(report), completed.returncode


def parse_report(path: Path) -> list[dict]:
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        properties = {p.get("name"): p.get("value") for p in case.iter("property")}
        failure = case.find("failure")
        error = case.find("error")
        skipped = case.find("skipped")
        if failure is not None or error is not None:
            result = "FAIL"
            problem = failure if failure is not None else error
            observed = properties.get("observed") or (problem.get("message") or "").splitlines()[0][:160]
        elif skipped is not None:
            result, observed = "SKIP", (skipped.get("message") or "")[:160]
        else:
            result, observed = "pass", properties.get("observed", "")
        rows.append(
            {
                "scenario": properties.get("scenario") or case.get("name"),
                "kind": "scenario" if "scenario" in properties else "supporting check",
                "expected": properties.get("expected", ""),
                "observed": observed,
                "result": result,
                "test": f"{case.get('classname')}::{case.get('name')}",
                "seconds": round(float(case.get("time") or 0.0), 1),
            }
        )
    return rows


def print_table(rows: list[dict]) -> None:
    columns = ("scenario", "expected", "observed", "result", "seconds")
    widths = {c: min(60, max(len(c), *(len(str(r[c])) for r in rows))) for c in columns} if rows else {}
    print(" | ".join(c.ljust(widths.get(c, len(c))) for c in columns))
    print("-+-".join("-" * widths.get(c, len(c)) for c in columns))
    for row in rows:
        # One line per scenario: messages may hold newlines.
        print(" | ".join(" ".join(str(row[c]).split())[:60].ljust(widths[c]) for c in columns))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="keyword", help="run only scenarios matching this pytest -k expression")
    args = parser.parse_args()
    started = time.perf_counter()
    rows, exit_code = run_scenarios(args.keyword)
    print_table(rows)
    failed = [r["scenario"] for r in rows if r["result"] == "FAIL"]
    summary = {
        "scenarios": sum(r["kind"] == "scenario" for r in rows),
        "supporting_checks": sum(r["kind"] != "scenario" for r in rows),
        "passed": sum(r["result"] == "pass" for r in rows),
        "failed": len(failed),
        "skipped": sum(r["result"] == "SKIP" for r in rows),
        "failed_scenarios": failed,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary))
    return 0 if rows and not failed and exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
