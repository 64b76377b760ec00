#!/usr/bin/env python3
"""The one schema of every benchmark result, bench/results/*.json (docs/benchmarks.md).

Every result has these fields:

  name        the benchmark (the file's name without .json)
  measured    what was measured, in words
  mpitrain    {value, unit, ...}: mpitrain's figure
  baseline    {name, value, unit, ...}: the same figure of the thing compared with
  ratio       mpitrain's speed / the baseline's (> 1 = mpitrain faster)
  goal        {text, ...}: the goal it is held to (ratio_at_least when it is a ratio)
  goal_met    true or false
  machine     {host, cpu, ...}: where it ran
  date        when it ran (UTC, ISO 8601)
  git_commit  the commit measured

A result with nothing to compare with (a model rather than a measurement) has baseline, ratio,
goal and goal_met null, and says why in `no_baseline` and `no_goal`: null is allowed only with
the reason beside it.

  python3 bench/result_schema.py FILE...   checks files; exit 1 and one line per problem if any
"""

import json
import numbers
import os
import sys

REQUIRED = ("name", "measured", "mpitrain", "baseline", "ratio", "goal", "goal_met", "machine", "date",
            "git_commit")


def _text(value):
    return isinstance(value, str) and value.strip() != ""


def _number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def problems(result):
    """What RESULT lacks or has wrong, as a list of sentences (empty: it fits the schema)."""
    if not isinstance(result, dict):
        return ["not a JSON object"]
    found = [f"no field '{key}'" for key in REQUIRED if key not in result]
    if found:
        return found
    if not _text(result["name"]):
        found.append("name is not a non-empty string")
    if not _text(result["measured"]):
        found.append("measured is not a non-empty string")
    ours = result["mpitrain"]
    if not (isinstance(ours, dict) and _number(ours.get("value")) and _text(ours.get("unit"))):
        found.append("mpitrain is not {value: number, unit: text, ...}")
    theirs = result["baseline"]
    if theirs is None:
        if not _text(result.get("no_baseline")):
            found.append("baseline is null without a reason in no_baseline")
        if result["ratio"] is not None:
            found.append("ratio is set but baseline is null")
    else:
        if not (isinstance(theirs, dict) and _text(theirs.get("name")) and _number(theirs.get("value"))
                and _text(theirs.get("unit"))):
            found.append("baseline is not {name: text, value: number, unit: text, ...}")
        if not _number(result["ratio"]):
            found.append("ratio is not a number")
    goal = result["goal"]
    if goal is None:
        if not _text(result.get("no_goal")):
            found.append("goal is null without a reason in no_goal")
        if result["goal_met"] is not None:
            found.append("goal_met is set but goal is null")
    else:
        if not (isinstance(goal, dict) and _text(goal.get("text"))):
            found.append("goal is not {text: text, ...}")
        if not isinstance(result["goal_met"], bool):
            found.append("goal_met is not true or false")
    machine = result["machine"]
    if not (isinstance(machine, dict) and _text(machine.get("host")) and _text(machine.get("cpu"))):
        found.append("machine is not {host: text, cpu: text, ...}")
    if not (_text(result["date"]) and result["date"][:4].isdigit() and "T" in result["date"]):
        found.append("date is not an ISO 8601 time")
    if not _text(result["git_commit"]):
        found.append("git_commit is not a non-empty string")
    return found


def main(paths):
    if not paths:
        print(__doc__.strip())
        return 2
    bad = 0
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                result = json.load(f)
        except (OSError, ValueError) as e:
            print(f"{path}: cannot read: {e}")
            bad += 1
            continue
        found = problems(result)
        stem = os.path.splitext(os.path.basename(path))[0]
        if not found and result["name"] != stem:
            found.append(f"name '{result['name']}' differs from the file's name '{stem}'")
        for problem in found:
            print(f"{path}: {problem}")
        bad += bool(found)
    print(f"{len(paths) - bad} of {len(paths)} result(s) fit the schema (bench/result_schema.py)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
