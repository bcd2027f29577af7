#!/usr/bin/env python3
"""Paired comparison of two `diffusiond eval --grid` runs on the same prompts and seeds.

Each `.txt` next to a grid lists one judged image a line:
`  N. [category] prompt — pass|FAIL (…) — seen …`. Two runs of the same
benchmark (same --per-category, --images and --seed) judge the same prompts
with the same noise, so their images pair up line by line. This prints each
run's accuracy per category, the images only one of them passed, and the
exact two-sided sign test on those discordant pairs (McNemar's exact test):
with 96 images the two runs' 95% intervals overlap for differences of under
~15 points, while a paired test sees smaller ones.

usage: scripts/compare_eval.py A.txt B.txt
"""

import re
import sys
from collections import defaultdict
from math import comb

LINE = re.compile(r"^\s*(\d+)\. \[(\w+)\] (.*?) — (pass|FAIL)")


def read(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = LINE.match(line)
            if m:
                rows.append((m.group(2), m.group(3), m.group(4) == "pass"))
    if not rows:
        sys.exit(f"{path}: no judged lines")
    return rows


def sign_test(only_a, only_b):
    """Two-sided exact binomial p of only_a vs only_b under p = 1/2."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    a, b = read(sys.argv[1]), read(sys.argv[2])
    if [(c, p) for c, p, _ in a] != [(c, p) for c, p, _ in b]:
        sys.exit("the two runs judged different prompts: compare runs of the same benchmark")
    per = defaultdict(lambda: [0, 0, 0])
    for (cat, _, pa), (_, _, pb) in zip(a, b):
        per[cat][0] += 1
        per[cat][1] += pa
        per[cat][2] += pb
    only_a = sum(pa and not pb for (*_, pa), (*_, pb) in zip(a, b))
    only_b = sum(pb and not pa for (*_, pa), (*_, pb) in zip(a, b))
    print(f"| category | images | A | B |\n|---|---:|---:|---:|")
    for cat, (n, sa, sb) in per.items():
        print(f"| {cat} | {n} | {100 * sa / n:.1f} | {100 * sb / n:.1f} |")
    n = len(a)
    sa, sb = sum(p for *_, p in a), sum(p for *_, p in b)
    print(f"| overall | {n} | {100 * sa / n:.1f} | {100 * sb / n:.1f} |")
    print(f"\npassed by A only: {only_a}, by B only: {only_b}; "
          f"two-sided sign test p = {sign_test(only_a, only_b):.3f}")


if __name__ == "__main__":
    main()
