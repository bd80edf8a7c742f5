#!/usr/bin/env bash
# Mutation testing of the pure-Python modules with mutmut 3 (configuration: [tool.mutmut] in pyproject.toml).
# Not part of CI: a full run takes tens of minutes on 2 CPU cores.
#
#   bash scripts/setup.sh                        # once: .venv and the compiled extension
#   bash bench/mutation.sh                       # every mutant of ssl.py, ops.py, degrade.py, kernels.py, data/, models/
#   bash bench/mutation.sh 'metaf2n.kernels*'    # only the mutants whose names match (mutmut's name globs)
#   MUTATION_SAMPLE=3 bash bench/mutation.sh     # every 3rd mutant (by sorted name): a third of the time
#
# Writes results/mutation/ (MUTATION_OUT to change it): summary.md (per module: mutants, killed, survived, timed out,
# no tests, score), mutants.tsv (the status of every mutant), survivors.md (the diff of every mutant not killed) and
# run.log (mutmut's output).
#
# How the compiled extension is handled: mutmut copies metaf2n/ into mutants/, rewrites the modules named in
# only_mutate and runs the tests against that copy. metaf2n._C (C++/CUDA) is not Python, so it is never mutated; this
# script copies the built library next to the copied sources (mutants/metaf2n/), and tells scikit-build-core's editable
# import hook to stand aside (SKBUILD_EDITABLE_SKIP), since that hook would otherwise import the unmutated sources of
# the checkout instead of the copy. mutmut refuses to go on if its forced-failure check shows that the mutated copy is
# not the one imported.
#
# CPU use: one mutant at a time (--max-children 1), under nice -n 19, with MUTATION_THREADS (default 1) torch threads.
# Each mutant runs only the tests that called the mutated function, out of the fast CPU tests of those modules
# (pytest_add_cli_args in pyproject.toml leaves out the slow, CUDA, training, inference and face tests).
# The whole script is one block, read before it runs: editing this file during a run cannot change that run.
{
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
out=${MUTATION_OUT:-results/mutation}
if [ ! -x "$py" ]; then
  echo "no .venv: run 'bash scripts/setup.sh' first" >&2
  exit 1
fi
if ! "$py" -c "import importlib.metadata as m, sys; sys.exit(m.version('mutmut') != '3.8.1')" 2>/dev/null; then
  "$py" -m pip install --quiet -r requirements-dev.txt
fi

# The built extension (in build/ for an editable install, in metaf2n/ for an in-place build).
so=$("$py" -c "import importlib.util; print(importlib.util.find_spec('metaf2n._C').origin)")
# The build directory that scikit-build-core's editable finder redirects metaf2n imports to ("" when not editable).
skip=$("$py" - <<'PY'
import sys
print(":".join(f.path for f in sys.meta_path
               if type(f).__name__ == "ScikitBuildRedirectingFinder" and "metaf2n" in f.known_source_files and f.path))
PY
)

rm -rf mutants  # mutmut reuses old verdicts of unchanged functions even when the tests changed: start afresh
mkdir -p mutants/metaf2n "$out"
cp "$so" mutants/metaf2n/
export SKBUILD_EDITABLE_SKIP="${skip}${SKBUILD_EDITABLE_SKIP:+:$SKBUILD_EDITABLE_SKIP}"
export OMP_NUM_THREADS=${MUTATION_THREADS:-1} MKL_NUM_THREADS=${MUTATION_THREADS:-1}
start=$(date +%s)
set +e
sample=${MUTATION_SAMPLE:-1}
if [ "$sample" -gt 1 ] && [ $# -eq 0 ]; then
  # A full run costs ~0.5-1 s of pytest per mutant; a deterministic sample keeps a run bounded. A first, tiny run
  # generates every mutant and records which tests call which function (it tests the first mutants of masknet.py);
  # then only the sample is run.
  nice -n 19 .venv/bin/mutmut run --max-children 1 'metaf2n.models.masknet.*__mutmut_1' >"$out/prepare.log" 2>&1
  mapfile -t names < <("$py" -c "
import json, pathlib
names = sorted(n for m in pathlib.Path('mutants').rglob('*.py.meta') for n in json.loads(m.read_text())['exit_code_by_key'])
print('\n'.join(names[::$sample]))
")
  if [ ${#names[@]} -eq 0 ]; then
    echo "mutmut generated no mutants; see $out/prepare.log" >&2
    exit 1
  fi
  echo "sample: ${#names[@]} mutants (every ${sample}th by name)"
  set -- "${names[@]}"
fi
nice -n 19 .venv/bin/mutmut run --max-children 1 "$@" >"$out/run.log" 2>&1
status=$?
set -e
echo "mutmut exited with $status after $(( $(date +%s) - start )) s (log: $out/run.log)"
tail -5 "$out/run.log" | tr '\r' '\n' | tail -3
"$py" bench/mutation_table.py --out "$out" --seconds $(( $(date +%s) - start ))
exit $status
}
