"""``python -m bench``: measure the library against the raw tools, side by side, in one run.

Prints the machine, then one markdown table of figures, ratios and targets, then a cProfile
summary of the library side for every missed target. Exit status: 0 when every target holds,
1 when one is missed, 2 when none is missed but something could not be measured (a service
down, a provider not available).

    python -m bench                  # full run (medians of 3 runs)
    python -m bench --quick          # smaller sizes, about a minute or two
    python -m bench --only dispatch,memory --runs 5 --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
import time
import traceback
from collections.abc import Sequence

from . import _report
from ._report import FAIL, NA, PASS, Row

MEASUREMENTS = ("capture", "dispatch", "crossprocess", "groups", "memory", "writers", "inbox",
                "ordered")
#: Runs per measurement when --runs is not given. Timed figures are medians of 3 runs; the
#: group drain (whose target is a count: nothing handled twice or lost) and the RSS growth
#: run once; the concurrent writers run twice (about 80 s). --quick keeps 3 runs for the cheap
#: in-process figures, one for the rest.
FULL_RUNS = {"capture": 3, "dispatch": 3, "crossprocess": 3, "groups": 1, "memory": 1,
             "writers": 2, "inbox": 3, "ordered": 3}
QUICK_RUNS = {"capture": 3, "dispatch": 3, "crossprocess": 1, "groups": 1, "memory": 1,
              "writers": 1, "inbox": 3, "ordered": 1}


def _profile_failures(enabled: bool) -> callable:  # type: ignore[valid-type]
    done: set[int] = set()  # a profiler shared by several rows runs once

    def profile(rows: list[Row]) -> None:
        if not enabled:
            return
        for row in rows:
            fn = row.profiler
            if row.status == FAIL and fn is not None and not row.profile and id(fn) not in done:
                done.add(id(fn))
                try:
                    row.profile = fn()
                except Exception as exc:  # noqa: BLE001 - a profile is a bonus
                    row.profile = f"(profiling failed: {type(exc).__name__}: {exc})"
            row.profiler = None

    return profile


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a minute or two)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {MEASUREMENTS}")
    ap.add_argument("--runs", type=int, default=None,
                    help="runs per figure, the median is reported (default 3; 2 for writers; "
                         "1 for groups, memory)")
    ap.add_argument("--markdown", default="", metavar="PATH",
                    help="also write the report (machine, table, profiles) to PATH")
    ap.add_argument("--no-profile", action="store_true",
                    help="do not profile the library side of missed targets")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()] or list(MEASUREMENTS)
    unknown = [s for s in only if s not in MEASUREMENTS]
    if unknown:
        ap.error(f"--only: unknown {unknown}; choose from {', '.join(MEASUREMENTS)}")
    if args.runs is not None and args.runs < 1:
        ap.error("--runs: expected >= 1")
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")

    from ._env import server_versions

    started = time.perf_counter()
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = _report.machine(server_versions())
    command = "python -m bench" + " ".join([""] + (argv if argv is not None else sys.argv[1:]))
    print(f"# sqlalchemy-eventbroker benchmarks\n\n`{command}` — {when}\n\n{machine}\n",
          flush=True)

    profile = _profile_failures(not args.no_profile)
    rows: list[Row] = []
    for name in MEASUREMENTS:
        if name not in only:
            continue
        runs = args.runs or (QUICK_RUNS if args.quick else FULL_RUNS)[name]
        t0 = time.perf_counter()
        print(f"... {name} (runs={runs})", file=sys.stderr, flush=True)
        try:
            module = __import__(f"bench.{name}", fromlist=["run"])
            part = module.run(args.quick, runs, profile)
        except Exception as exc:  # noqa: BLE001 - one broken measurement must not hide others
            traceback.print_exc()
            part = [Row(name, "(whole measurement)", "error", "", "–", "", FAIL,
                        f"{type(exc).__name__}: {exc}"[:300])]
        profile(part)
        rows += part
        print(f"    {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    elapsed = time.perf_counter() - started
    failed = [r for r in rows if r.status == FAIL]
    missing = [r for r in rows if r.status == NA]
    passed = [r for r in rows if r.status == PASS]
    summary = (f"{len(passed)} passed, {len(failed)} failed, {len(missing)} not available "
               f"(total {elapsed:.0f} s)")
    out = [_report.table(rows), "", summary]
    profiles = [r for r in rows if r.profile]
    if profiles:
        out += ["", "## Where the time goes (cProfile of the library side, missed targets)"]
        for r in profiles:
            out += ["", f"### {r.section}: {r.name}", "", "```", r.profile, "```"]
    text = "\n".join(out)
    print(text, flush=True)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(f"# Benchmark run\n\nCommand: `{command}` ({when})\n\n## Machine\n\n"
                    f"{machine}\n\n## Results\n\n{text}\n")
    if failed:
        return 1
    if missing:
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
