"""Tabulate a mutmut run (the mutants/ directory left by bench/mutation.sh) per module.

Writes OUT/summary.md (per module: mutants, killed, survived, timed out, no tests, other, score), OUT/mutants.tsv
(module, mutant, status) and OUT/survivors.md (the diff of every mutant that was not killed). The score counts killed
and timed-out mutants over all mutants; "no tests" (no selected test calls the function) counts as not killed.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

COLUMNS = ("killed", "survived", "timeout", "no tests")


def statuses(root: Path) -> dict[str, dict[str, str]]:
    """{module path: {mutant name: status}} from mutmut's .meta files under root/mutants."""
    from mutmut.stats import status_by_exit_code

    out: dict[str, dict[str, str]] = {}
    for meta in sorted((root / "mutants").rglob("*.py.meta")):
        module = str(meta.relative_to(root / "mutants"))[: -len(".meta")]
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        out[module] = {name: status_by_exit_code[code] for name, code in sorted(codes.items())}
    return out


def row(name: str, counts: Counter) -> str:
    total = sum(counts.values()) - counts["not checked"]
    other = total - sum(counts[c] for c in COLUMNS)
    score = 100 * (counts["killed"] + counts["timeout"]) / total if total else float("nan")
    cells = [name, total, *(counts[c] for c in COLUMNS), other, f"{score:.1f}%"]
    if counts["not checked"]:
        cells[1] = f"{total} (of {total + counts['not checked']})"
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/mutation"))
    parser.add_argument("--seconds", type=int, default=None, help="wall time of the run, for the summary")
    args = parser.parse_args(argv)
    root = Path.cwd()
    by_module = statuses(root)
    if not by_module:
        raise SystemExit("no mutmut results under mutants/: run bench/mutation.sh first")
    args.out.mkdir(parents=True, exist_ok=True)

    lines = [
        "# Mutation testing (mutmut)",
        "",
        f"Run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
        + (f", {args.seconds / 60:.1f} min wall time" if args.seconds is not None else "")
        + ". Score = (killed + timed out) / mutants; \"no tests\" = no selected test calls the mutated function;"
        " \"other\" = suspicious or segfault. \"N (of M)\": a sampled run tested N of the module's M mutants.",
        "",
        "| module | mutants | killed | survived | timed out | no tests | other | score |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    groups: dict[str, Counter] = {}
    total: Counter = Counter()
    for module, mutants in by_module.items():
        counts = Counter(mutants.values())
        lines.append(row(module, counts))
        parent = str(Path(module).parent)
        if parent != "metaf2n":
            groups.setdefault(parent + "/", Counter()).update(counts)
        total.update(counts)
    lines += [row(f"**{name}** (all files)", counts) for name, counts in groups.items()]
    lines.append(row("**total**", total))
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4:]))

    with open(args.out / "mutants.tsv", "w") as f:
        f.write("module\tmutant\tstatus\n")
        for module, mutants in by_module.items():
            f.writelines(f"{module}\t{name}\t{status}\n" for name, status in mutants.items())

    from mutmut.mutation.diff_apply import get_diff_for_mutant

    diffs = ["# Mutants not killed", ""]
    for module, mutants in by_module.items():
        for name, status in mutants.items():
            if status in ("killed", "timeout", "not checked"):
                continue
            diff = get_diff_for_mutant(name, path=module)
            diffs += [f"## {name}: {status}", "", "```diff", diff, "```", ""]
    (args.out / "survivors.md").write_text("\n".join(diffs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
