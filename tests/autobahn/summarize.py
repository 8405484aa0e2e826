# -*- coding: utf-8 -*-
"""Judge an Autobahn|Testsuite fuzzingclient report of chatd and summarize it.

Reads reports/index.json (and each case's JSON report for the cases that are
not OK), prints counts per section and result, writes them as markdown, and
exits 1 when:
  - a case of sections 1-7 or 10 is not OK, NON-STRICT or INFORMATIONAL;
  - a case of sections 12 or 13 is not UNIMPLEMENTED;
  - a case the spec selected has no result (the run broke off).
Section 9 (limits/performance) is reported case by case with durations and
does not fail the run. Runs under the suite's Python 2.7 (also Python 3).
Called by run.sh; see there.
"""
from __future__ import print_function, division

import argparse
import io
import json
import os
import sys
import time
import warnings

warnings.simplefilter("ignore")

MUST_CONFORM = set(["1", "2", "3", "4", "5", "6", "7", "10"])
MUST_CONFORM_OK = ["OK", "NON-STRICT", "INFORMATIONAL"]
MUST_DECLINE = set(["12", "13"])
LIMITS = set(["9"])
RESULTS = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]
SECTION_NAMES = {
    "1": "Framing",
    "2": "Pings/Pongs",
    "3": "Reserved Bits",
    "4": "Opcodes",
    "5": "Fragmentation",
    "6": "UTF-8 Handling",
    "7": "Close Handling",
    "9": "Limits/Performance",
    "10": "Misc (auto-fragmentation)",
    "12": "Compression (payloads)",
    "13": "Compression (parameters)",
}


def case_key(case_id):
    return tuple(int(p) for p in case_id.split("."))


def section_of(case_id):
    return case_id.split(".")[0]


def rule_for(section):
    if section in MUST_CONFORM:
        return "OK, NON-STRICT or INFORMATIONAL"
    if section in MUST_DECLINE:
        return "UNIMPLEMENTED"
    if section in LIMITS:
        return "within limits (reported)"
    return "reported"


def judged_ok(section, behavior):
    if section in MUST_CONFORM:
        return behavior in MUST_CONFORM_OK
    if section in MUST_DECLINE:
        return behavior == "UNIMPLEMENTED"
    return True


def expected_cases(spec):
    """The case ids the spec selects, as the suite resolves them (None if
    the suite cannot be imported, e.g. under another Python)."""
    try:
        from autobahntestsuite.case import (Cases, CaseCategories,
                                            CaseSubCategories, CaseBasename)
        from autobahntestsuite.caseset import CaseSet
    except Exception:  # pragma: no cover - only outside the suite's venv
        return None
    cs = CaseSet("fuzzing", CaseBasename, Cases, CaseCategories, CaseSubCategories)
    return cs.parseSpecCases(spec)


def one_line(text, limit=300):
    text = " ".join(("%s" % text).replace("|", "\\|").split())
    # The suite's descriptions carry a little HTML (<br>, <b>).
    for tag in ("<br>", "<br/>", "<b>", "</b>", "<p>", "</p>"):
        text = text.replace(tag, " ")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reports", required=True)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--agent", default="chatd")
    ap.add_argument("--mode", default="full")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--elapsed", type=int, default=0)
    ap.add_argument("--suite", default="")
    ap.add_argument("--python", default="")
    ap.add_argument("--markdown", default="")
    ap.add_argument("--load", default="")
    args = ap.parse_args()

    with io.open(os.path.join(args.reports, "index.json"), encoding="utf-8") as f:
        index = json.load(f)
    with io.open(args.spec, encoding="utf-8") as f:
        spec = json.load(f)
    results = index.get(args.agent, {})
    ids = sorted(results, key=case_key)

    def report(case_id):
        name = results[case_id].get("reportfile")
        if not name:
            return {}
        try:
            with io.open(os.path.join(args.reports, name), encoding="utf-8") as f:
                return json.load(f)
        except (IOError, OSError, ValueError):
            return {}

    problems = []
    want = expected_cases(spec)
    missing = []
    if want is not None:
        missing = sorted(set(want) - set(results), key=case_key)
        if missing:
            problems.append("%d selected case(s) have no result: %s" % (
                len(missing), ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")))

    sections = {}
    for case_id in ids:
        r = results[case_id]
        s = sections.setdefault(section_of(case_id), {"cases": 0, "counts": {}, "close_not_ok": 0})
        s["cases"] += 1
        b = r.get("behavior", "?")
        s["counts"][b] = s["counts"].get(b, 0) + 1
        if r.get("behaviorClose") not in ("OK", "INFORMATIONAL", "UNIMPLEMENTED"):
            s["close_not_ok"] += 1

    bad = []  # (case, behavior) that break the rules
    notable = []  # not OK at all, outside 12/13's expected UNIMPLEMENTED
    for case_id in ids:
        r = results[case_id]
        sec = section_of(case_id)
        b = r.get("behavior")
        bc = r.get("behaviorClose")
        if not judged_ok(sec, b):
            bad.append(case_id)
        expected_here = (sec in MUST_DECLINE and b == "UNIMPLEMENTED") or b == "OK"
        close_fine = bc in ("OK", "INFORMATIONAL", "UNIMPLEMENTED") or (sec in MUST_DECLINE and b == "UNIMPLEMENTED")
        if not expected_here or not close_fine or not judged_ok(sec, b):
            notable.append(case_id)
    if bad:
        problems.append("%d case(s) break the rules: %s" % (len(bad), ", ".join(bad)))

    extra = sorted(set(b for s in sections.values() for b in s["counts"]) - set(RESULTS))
    columns = RESULTS + extra
    verdict = "PASS" if not problems else "FAIL"

    lines = []
    w = lines.append
    w("# Autobahn|Testsuite: chatd's WebSocket transport")
    w("")
    w("Written by `tests/autobahn/run.sh`: the suite's fuzzingclient against "
      "`chatd --ws-echo` (every message echoed back, no login or routing), "
      "`--max-line 16777216 --max-outbound 67108864`, on loopback.")
    w("")
    w("| | |")
    w("| --- | --- |")
    w("| run | %s (cases %s, excluded %s) |" % (
        args.mode, ", ".join("`%s`" % c for c in spec.get("cases", [])),
        ", ".join("`%s`" % c for c in spec.get("exclude-cases", [])) or "none"))
    w("| date | %s |" % time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    w("| chatd commit | %s |" % one_line(args.commit))
    w("| suite | %s, %s |" % (args.suite, args.python))
    w("| cases run | %d, in %d s (%s) |" % (len(ids), args.elapsed, "%d min %02d s" % divmod(args.elapsed, 60)))
    if args.load:
        w("| load average | %s: durations are wall-clock, other work on the machine lengthens them |" % args.load)
    w("| verdict | **%s** |" % verdict)
    w("")
    w("Rules: sections 1-7 and 10 must be OK, NON-STRICT or INFORMATIONAL; "
      "12 and 13 (permessage-deflate, which chatd declines) UNIMPLEMENTED; "
      "section 9 (limits/performance) is reported with durations. The suite "
      "judges the closing handshake separately (\"close not OK\": FAILED, "
      "WRONG CODE, UNCLEAN, FAILED BY CLIENT); that column is reported, not judged.")
    w("")
    w("## Results per section")
    w("")
    w("| section | name | cases | " + " | ".join(columns) + " | close not OK | rule | judged |")
    w("| --- | --- | ---: | " + " | ".join("---:" for _ in columns) + " | ---: | --- | --- |")
    total = {"cases": 0, "close_not_ok": 0}
    for sec in sorted(sections, key=int):
        s = sections[sec]
        ok = all(judged_ok(sec, b) for b in s["counts"])
        total["cases"] += s["cases"]
        total["close_not_ok"] += s["close_not_ok"]
        for c in columns:
            total[c] = total.get(c, 0) + s["counts"].get(c, 0)
        w("| %s | %s | %d | %s | %d | %s | %s |" % (
            sec, SECTION_NAMES.get(sec, "?"), s["cases"],
            " | ".join(str(s["counts"].get(c, 0)) for c in columns),
            s["close_not_ok"], rule_for(sec),
            ("ok" if ok else "**FAIL**") if sec not in LIMITS else "reported"))
    w("| all | | %d | %s | %d | | |" % (
        total["cases"], " | ".join(str(total.get(c, 0)) for c in columns), total["close_not_ok"]))
    w("")
    if problems:
        w("## Problems")
        w("")
        for p in problems:
            w("- " + p)
        w("")
    w("## Cases that are not plainly OK")
    w("")
    if not notable:
        w("None (12/13 UNIMPLEMENTED, as expected, are not listed).")
    else:
        w("Sections 12/13's expected UNIMPLEMENTED are not listed. Details in "
          "target/autobahn/reports/ (`chatd_case_*.html` has the wire log).")
        w("")
        w("| case | behavior | close | close code | description | expectation | result |")
        w("| --- | --- | --- | ---: | --- | --- | --- |")
        for case_id in notable:
            r = results[case_id]
            d = report(case_id)
            w("| %s | %s%s | %s | %s | %s | %s | %s |" % (
                case_id, r.get("behavior"), "" if case_id not in bad else " (**rule broken**)",
                r.get("behaviorClose"), r.get("remoteCloseCode"),
                one_line(d.get("description", "")), one_line(d.get("expectation", "")),
                one_line("%s %s" % (d.get("result", ""), d.get("resultClose", "")))))
    w("")
    nine = [c for c in ids if section_of(c) in LIMITS]
    if nine:
        w("## Section 9: limits and performance")
        w("")
        w("| case | result | close | duration ms | description |")
        w("| --- | --- | --- | ---: | --- |")
        for case_id in nine:
            r = results[case_id]
            d = report(case_id)
            w("| %s | %s | %s | %s | %s |" % (
                case_id, r.get("behavior"), r.get("behaviorClose"), r.get("duration"),
                one_line(d.get("description", ""), 160)))
        w("")
        w("Section 9 in all: %d ms over %d cases." % (
            sum(results[c].get("duration") or 0 for c in nine), len(nine)))
        w("")
    text = "\n".join(lines)

    if args.markdown:
        with io.open(args.markdown, "w", encoding="utf-8") as f:
            f.write(text if isinstance(text, type(u"")) else text.decode("utf-8"))
    # Terse version on stdout.
    print("autobahn: %s run of %d cases in %d s: %s" % (args.mode, len(ids), args.elapsed, verdict))
    for sec in sorted(sections, key=int):
        s = sections[sec]
        counts = ["%s %d" % (c, s["counts"][c]) for c in columns if s["counts"].get(c)]
        if s["close_not_ok"]:
            counts.append("close-not-OK %d" % s["close_not_ok"])
        print("  %-3s %-26s %4d cases: %s%s" % (
            sec, SECTION_NAMES.get(sec, "?"), s["cases"], ", ".join(counts),
            "" if all(judged_ok(sec, b) for b in s["counts"]) else "  <- FAIL"))
    for case_id in notable:
        r = results[case_id]
        print("  not OK: %s behavior=%s close=%s code=%s%s" % (
            case_id, r.get("behavior"), r.get("behaviorClose"), r.get("remoteCloseCode"),
            "  <- breaks the rule" if case_id in bad else ""))
    for p in problems:
        print("autobahn: FAIL: " + p)
    if args.markdown:
        print("autobahn: summary in %s, reports in %s/index.html" % (args.markdown, args.reports))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
