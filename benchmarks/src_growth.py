"""How much issue 12 (options model, calibration and export seams) grew `src/`, after clean-ups.

    python benchmarks/src_growth.py [--filed f3f7f0a] [--ended d103adc] [--cleanup-from 6b6d41e]

Issue 12 bounds the growth of `src/` to 3% over the tree it was filed against (`--filed`). Its
commits ended at `--ended`; issues 13-16 then added features (streaming, GPU placement, sparse
formats) whose lines are not the refactor's. The clean-up commits since `--cleanup-from` removed
code, some of it code that existed at `--ended`: that code is found with `git blame`, and every
line those commits added, whatever it is for, counts against it. So

    equivalent = lines(--ended) - (removed lines that existed at --ended) + (all added lines)

is what `src/` at `--ended` would measure with the clean-ups applied, counted conservatively.
Needs the git history (a full clone); prints the figures.
"""

from __future__ import annotations

import argparse
import re
import subprocess

HUNK = re.compile(r"@@ -(\d+)(?:,(\d+))? \+\d+(?:,(\d+))? @@")


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout


def src_lines(rev: str) -> int:
    files = [f for f in git("ls-tree", "-r", "--name-only", rev, "src").split() if f.endswith(".py")]
    return sum(git("show", f"{rev}:{f}").count("\n") for f in files)


def cleanup_account(start: str, head: str, ended: str) -> tuple[int, int, int]:
    """(removed lines that existed at `ended`, removed later lines, added lines) of start..head."""
    removed_old = removed_later = added = 0
    is_old: dict[str, bool] = {}
    for commit in git("rev-list", "--reverse", f"{start}..{head}").split():
        path = None
        for line in git("diff", "-U0", f"{commit}^", commit, "--", "src").splitlines():
            if line.startswith("--- "):
                path = line[6:] if line.startswith("--- a/") else None
            match = HUNK.match(line)
            if not match:
                continue
            first, old_count = int(match[1]), int(match[2] if match[2] is not None else 1)
            added += int(match[3] if match[3] is not None else 1)
            if not old_count or path is None:
                continue
            span = f"{first},{first + old_count - 1}"
            blame = git("blame", "--line-porcelain", "-L", span, f"{commit}^", "--", path)
            for sha in re.findall(r"^([0-9a-f]{40}) ", blame, re.M):
                if sha not in is_old:
                    ancestor = ["git", "merge-base", "--is-ancestor", sha, ended]
                    is_old[sha] = subprocess.run(ancestor).returncode == 0
                removed_old += is_old[sha]
                removed_later += not is_old[sha]
    return removed_old, removed_later, added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filed", default="f3f7f0a", help="the tree issue 12 was filed against")
    parser.add_argument("--ended", default="d103adc", help="the last commit of issue 12")
    parser.add_argument("--cleanup-from", default="6b6d41e", help="clean-ups are the commits after it")
    parser.add_argument("--head", default="HEAD")
    args = parser.parse_args()
    filed, ended, head = src_lines(args.filed), src_lines(args.ended), src_lines(args.head)
    removed_old, removed_later, added = cleanup_account(args.cleanup_from, args.head, args.ended)
    equivalent = ended - removed_old + added
    print(f"src/ lines at {args.filed} (filed): {filed:,}")
    print(f"src/ lines at {args.ended} (issue 12 ended): {ended:,} ({ended / filed - 1:+.1%})")
    print(f"clean-ups {args.cleanup_from}..{args.head}: removed {removed_old:,} lines that existed "
          f"at {args.ended} and {removed_later:,} later lines; added {added:,}")
    print(f"issue-12 tree with the clean-ups: {equivalent:,} lines ({equivalent / filed - 1:+.1%}; "
          f"bound +3% = {int(filed * 1.03):,})")
    print(f"src/ lines at {args.head} (with issues 13-16): {head:,}")


if __name__ == "__main__":
    main()
