#!/usr/bin/env python3
"""critest results for tests/cri (stdlib only).

    report.py follow LOG PID     print failures and progress while PID writes LOG
    report.py junit RESDIR       RESDIR/junit.xml -> RESDIR/results.tsv and RESDIR/summary.txt
    report.py table DIR...       a Markdown table of spec × result directory (for docs/cri.md)
    report.py total DIR...       the summary of several result directories, and a closing
                                 `cri: N passed, N failed, N skipped` line

results.tsv: one line per spec, `status<TAB>seconds<TAB>spec name`, status one of passed,
failed, skipped (ginkgo's pending/panicked/timedout/interrupted count as failed).
"""

import os
import re
import sys
import time
import xml.etree.ElementTree as ET

SPEC_END = re.compile(r"^(?:•|S) (?:\[(FAILED|SKIPPED|PANICKED|TIMEDOUT|INTERRUPTED)\] )?\[([0-9.]+) seconds\]")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def follow(log, pid):
    """Tails LOG until process PID ends. Ginkgo prints `•` per passed spec and `S` per skipped
    one, and a `• [FAILED] [N seconds]` block, with the spec's name on the next line, per
    failure: this prints each failure and a progress line now and then."""
    pid = int(pid)
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    pos = 0
    pending = None  # the time of a failure waiting for the spec's name on the next lines
    buf = ""
    last = time.monotonic()
    shown = 0

    def alive():
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False

    def progress():
        return f"cri: progress: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"

    while True:
        running = alive()
        try:
            with open(log, "r", errors="replace") as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
        except FileNotFoundError:
            chunk = ""
        buf += chunk
        lines = buf.split("\n")
        buf = lines.pop()
        for line in lines:
            line = ANSI.sub("", line).rstrip()
            if pending is not None:
                if not line.strip() or line.startswith("---"):
                    continue
                counts["failed"] += 1
                print(f"cri: FAIL {float(pending):6.1f}s  {line.strip()}", flush=True)
                pending = None
                continue
            m = SPEC_END.match(line)
            if m:
                if m.group(1) == "SKIPPED":
                    counts["skipped"] += 1
                elif m.group(1):
                    pending = m.group(2)
                else:
                    counts["passed"] += 1
                continue
            for ch in line:
                if ch == "\u2022":
                    counts["passed"] += 1
                elif ch == "S":
                    counts["skipped"] += 1
                else:
                    break
        done = sum(counts.values())
        if done != shown and time.monotonic() - last >= 60:
            print(progress(), flush=True)
            last, shown = time.monotonic(), done
        if not running:
            break
        time.sleep(1)
    print(progress(), flush=True)


def parse_junit(path):
    """[(status, seconds, name)] from a ginkgo JUnit report."""
    tree = ET.parse(path)
    rows = []
    for tc in tree.iter("testcase"):
        name = tc.get("name", "")
        if name.startswith("[It] "):
            name = name[5:]
        elif name.startswith("["):  # [BeforeSuite], [AfterSuite], [ReportAfterSuite] ...
            if tc.find("failure") is None and tc.find("error") is None:
                continue
        status = tc.get("status") or ""
        if tc.find("failure") is not None or tc.find("error") is not None:
            status = "failed"
        elif tc.find("skipped") is not None or status in ("skipped", "pending"):
            status = "skipped"
        elif status in ("", "passed"):
            status = "passed"
        else:
            status = "failed"
        rows.append((status, float(tc.get("time") or 0), " ".join(name.split())))
    rows.sort(key=lambda r: r[2])
    return rows


def junit(resdir):
    path = os.path.join(resdir, "junit.xml")
    label = os.path.basename(os.path.normpath(resdir))
    if not os.path.exists(path):
        msg = f"{label}: no junit.xml (critest did not run to the end; see critest.log)"
        with open(os.path.join(resdir, "summary.txt"), "w") as f:
            f.write(msg + "\n")
        print("cri: " + msg)
        return 1
    rows = parse_junit(path)
    with open(os.path.join(resdir, "results.tsv"), "w") as f:
        for status, secs, name in rows:
            f.write(f"{status}\t{secs:.1f}\t{name}\n")
    counts = {s: sum(1 for r in rows if r[0] == s) for s in ("passed", "failed", "skipped")}
    secs = ""
    try:
        secs = f" in {int(open(os.path.join(resdir, 'seconds')).read())} s"
    except (OSError, ValueError):
        pass
    lines = [f"{label}: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped{secs}"]
    lines += [f"  FAIL {name}" for status, _, name in rows if status == "failed"]
    with open(os.path.join(resdir, "summary.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join("cri: " + l for l in lines))
    return 0


def load(resdir):
    path = os.path.join(resdir, "results.tsv")
    if not os.path.exists(path):
        return None
    out = {}
    for line in open(path):
        status, secs, name = line.rstrip("\n").split("\t", 2)
        out[name] = status
    return out


def table(dirs):
    results = [(os.path.basename(os.path.normpath(d)), load(d)) for d in dirs]
    names = sorted({n for _, r in results if r for n in r})
    mark = {"passed": "pass", "failed": "**FAIL**", "skipped": "skip", None: "–"}
    print("| spec | " + " | ".join(label for label, _ in results) + " |")
    print("|---|" + "---|" * len(results))
    for n in names:
        cells = [mark[(r or {}).get(n)] for _, r in results]
        print(f"| {n.replace('|', '/')} | " + " | ".join(cells) + " |")


def total(dirs):
    p = f = s = 0
    for d in dirs:
        try:
            print("cri: " + open(os.path.join(d, "summary.txt")).read().rstrip().replace("\n", "\ncri: "))
        except OSError:
            print(f"cri: {os.path.basename(os.path.normpath(d))}: no results")
            f += 1
            continue
        r = load(d)
        if r is None:
            f += 1
            continue
        vals = list(r.values())
        p += vals.count("passed")
        f += vals.count("failed")
        s += vals.count("skipped")
    print(f"cri: {p} passed, {f} failed, {s} skipped")
    return 0 if f == 0 else 1


def main(argv):
    if len(argv) == 4 and argv[1] == "follow":
        follow(argv[2], argv[3])
        return 0
    if len(argv) == 3 and argv[1] == "junit":
        return junit(argv[2])
    if len(argv) >= 3 and argv[1] == "table":
        table(argv[2:])
        return 0
    if len(argv) >= 3 and argv[1] == "total":
        return total(argv[2:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
