#!/usr/bin/env bash
# Mutation score of the modules whose maths and bookkeeping everything depends on (issue 11, section 3), with
# mutmut 3 (pip install mutmut==3.8.1; not a tunelab dependency, not run in CI).
#
# mutmut rewrites each function of the listed modules into many small variants ("mutants": an operator flipped,
# a constant changed, a call argument dropped...) and runs the unit tests that reach that function against each.
# A mutant the tests do not notice "survived": either the tests miss a behaviour, or the change is equivalent.
# benchmarks/results/mutation.md holds the score per module and the triage of every survivor.
#
# Works on a snapshot of HEAD in a temporary directory (mutmut writes a mutants/ tree next to the sources), so
# the checkout is never touched. Usage: benchmarks/mutation.sh [OUT_JSON]   (default benchmarks/results/mutation.json)
# Environment: SETS (names below, default all), JOBS (parallel mutants, default the CPU count), RECHECK (a previous
# run's JSON: run only the mutants it left alive, e.g. after adding tests; the scores combine both runs), FULL (with
# RECHECK: modules whose code changed since that run, e.g. "tunelab.objectives.dpo": all their mutants run again and
# their scores are this run's alone, since a changed function's mutants are not the ones the previous run named).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$REPO/benchmarks/results/mutation.json}
PY=${PYTHON:-$REPO/.venv/bin/python}
JOBS=${JOBS:-$(nproc)}
DIFFS=${OUT%.json}_survivors
# group name | modules (globs under src/tunelab) | the unit/contract tests that exercise them
declare -A MODULES=(
  [objectives]="src/tunelab/objectives/*"
  [passk]="src/tunelab/evaluate/passk.py"
  [extract]="src/tunelab/evaluate/extract.py"
  [checkpoint]="src/tunelab/train/checkpoint.py"
  [packing]="src/tunelab/data/packing.py"
  [templating]="src/tunelab/data/templating.py"
  [batching]="src/tunelab/data/batching/*"
  [reference]="src/tunelab/train/reference.py"
)
declare -A TESTS=(
  [objectives]="tests/unit/test_logprobs.py tests/unit/test_objective_base.py tests/unit/test_objectives_pairwise.py tests/unit/test_objectives_other.py tests/unit/test_objectives_distill.py tests/unit/test_objectives_multi_target.py tests/unit/test_sft_loss.py tests/unit/test_leti.py"
  [passk]="tests/unit/test_passk.py"
  [extract]="tests/unit/test_extract.py"
  [checkpoint]="tests/unit/test_checkpoint.py"
  [packing]="tests/unit/test_packing.py tests/unit/test_packed_attention.py"
  [templating]="tests/unit/test_templating_labels.py tests/unit/test_data_formats.py"
  [batching]="tests/unit/test_batching.py tests/unit/test_batching_rows.py tests/unit/test_data_formats.py tests/unit/test_batch_tokens.py tests/unit/test_leti.py tests/unit/test_objectives_multi_target.py"
  [reference]="tests/unit/test_reference.py"
)
SETS=${SETS:-objectives passk extract checkpoint packing templating batching reference}
# the tokenisation cache would hand the tests units encoded before the mutation (mutmut switches mutants at run
# time, so the source files, and the cache key, are the same for all of them): encode afresh in every test run
export TUNELAB_DATA_CACHE=0
W=$(mktemp -d /tmp/tunelab-mutation.XXXXXX)
trap 'git -C "$REPO" worktree remove --force "$W/repo" >/dev/null 2>&1 || true; rm -rf "$W"' EXIT
git -C "$REPO" worktree add -q --detach "$W/repo" HEAD
# tests find ../shared/data relative to the repository; mutmut runs them from repo/mutants/
ln -s "$(cd "$REPO/../shared" && pwd)" "$W/repo/shared"
cp "$W/repo/pyproject.toml" "$W/repo/pyproject.toml.orig"
echo "{}" > "$W/all.json"
for g in $SETS; do
  cd "$W/repo" && rm -rf mutants
  sel=$(printf '"%s", ' ${TESTS[$g]}); only=$(cd "$W/repo" && printf '"%s", ' ${MODULES[$g]})
  python3 - "$W/repo/pyproject.toml" "$only" "$sel" <<'PY'
import re, sys
path, only, sel = sys.argv[1:]
text = open(path + ".orig").read()  # the checkout's own pyproject, with this group's section added
text += f"""
[tool.mutmut]
source_paths = ["src/tunelab"]
only_mutate = [{only}]
pytest_add_cli_args_test_selection = [{sel}]
pytest_add_cli_args = ["-q", "-p", "no:cacheprovider", "-x", "-W", "ignore"]
process_isolation = "forkserver"
"""
open(path, "w").write(text)
PY
  t0=$SECONDS
  mkdir -p "$DIFFS"
  only=()
  if [ -n "${RECHECK:-}" ]; then
    mapfile -t only < <(python3 -c "import json, sys; full = sys.argv[3].split(); [print(n) for m, v in json.load(open(sys.argv[1])).items() if v['group'] == sys.argv[2] and m not in full for n in v['not_killed']]" "$RECHECK" "$g" "${FULL:-}")
    for m in ${FULL:-}; do only+=("$m.*"); done
    [ ${#only[@]} -gt 0 ] || { echo "$g: nothing left alive in $RECHECK" >&2; continue; }
  fi
  "$PY" -m mutmut run --max-children "$JOBS" "${only[@]}" > "$DIFFS/$g.log" 2>&1 || echo "mutmut run $g: rc=$? (see $DIFFS/$g.log)" >&2
  "$PY" -m mutmut results --all true > "$W/$g.results" 2>&1 || true
  # the diff of every mutant the tests did not kill, for triage (kept beside the JSON)
  for m in $(grep -E ": (survived|no tests|suspicious|skipped|segfault)$" "$W/$g.results" | sed -n 's/^ *\(tunelab\.[^:]*\): .*/\1/p'); do
    echo "### $m ($(grep -F "$m:" "$W/$g.results" | sed 's/.*: //'))"; "$PY" -m mutmut show "$m" 2>&1 | grep -E '^[-+][^-+]'; echo
  done > "$DIFFS/$g.diff"
  "$PY" - "$W/$g.results" "$W/all.json" "$g" "$((SECONDS - t0))" "${RECHECK:-}" "${FULL:-}" <<'PY'
import json, re, sys
from collections import Counter, defaultdict
res, allf, group, secs, recheck, full = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6].split()
previous = {m: v for m, v in (json.load(open(recheck)) if recheck else {}).items() if m not in full}
per_module = defaultdict(Counter)
survivors = defaultdict(list)
status_of = {}
for line in open(res):
    m = re.match(r"\s*(tunelab\.[\w.]+)\.x[_\u01c1]\S*: (.+)$", line)  # module.x_function / module.xǁClassǁmethod
    if not m:
        continue
    name = line.split(":")[0].strip()
    module, status = m.group(1), m.group(2).strip()
    per_module[module][status] += 1
    status_of[name] = status
    if status not in ("killed", "timeout"):
        survivors[module].append(name)
data = json.load(open(allf))
if previous:  # only the previous run's survivors ran again: every other mutant keeps its earlier verdict
    for module, prev in previous.items():
        if prev["group"] != group:
            continue
        alive = set(prev["not_killed"])
        still = [n for n in survivors[module] if n in alive]
        c = Counter(status_of[n] for n in still)
        c["killed"] += prev.get("killed", 0) + len(alive) - len(still)
        c["timeout"] += prev.get("timeout", 0)
        per_module[module], survivors[module] = c, still
for module, c in per_module.items():
    total = sum(c.values())
    # a mutant that makes the tests hang (timeout) was noticed too: it counts as killed
    detected = c["killed"] + c["timeout"]
    data[module] = {"group": group, "total": total, **c, "score": round(detected / total, 4) if total else None,
                    "not_killed": sorted(survivors[module]), "group_seconds": secs}
json.dump(data, open(allf, "w"), indent=2)
for module, c in sorted(per_module.items()):
    print(f"{module}: {c['killed'] + c['timeout']}/{sum(c.values())} killed ({dict(c)})")
PY
done
cp "$W/all.json" "$OUT"
echo "wrote $OUT and the surviving mutants' diffs in $DIFFS/"
