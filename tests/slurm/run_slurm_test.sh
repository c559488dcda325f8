#!/usr/bin/env bash
# The DAG on a real SLURM cluster: a one-node slurmctld + slurmd on this machine (Debian's
# packages), every rule through to the report submitted through the SLURM profile as shipped
# (profiles/slurm, derived only where a CPU-only test node must differ), every job checked
# COMPLETED, the outputs compared with a local run. The test configuration is .test/config/.
#
#   bash tests/slurm/run_slurm_test.sh        # from the repository root, after `make setup`
#
# Needs root (apt-get, the daemons). Where the packages cannot be installed it prints
# "SKIPPED: <why>" and exits 0. Environment: PYTHON (default .venv/bin/python), KEEP_WORK=1 keeps
# the work directory (default: removed on success), LOCAL_TARGETS (default: the whole DAG) limits
# the local run. Steps:
#   1. install slurmctld slurmd munge slurm-client if missing (apt-get)
#   2. start munged (unless one already answers), then slurmctld and slurmd with a one-node
#      /etc/slurm/slurm.conf from tests/slurm/slurm.conf.in (removed again at the end; a machine
#      that has its own slurm.conf is skipped); state, spool and logs in a temporary directory
#   3. local run: the whole DAG in a copy of the workflow (profiles/default); a second dry-run must
#      have nothing to do; `snakemake --report` must embed every PNG of results/<run>/report; changing
#      filter_lang.keep must plan filter_lang and its descendants only
#   4. SLURM run: the whole DAG (every rule through to the report) in another copy, through
#      profiles/slurm-ci: profiles/slurm as shipped with only what a CPU-only one-node cluster
#      must change (no GPUs, memory and threads capped at the node's); the job partitions, the
#      set-resources blocks and show-failed-logs stay as shipped
#   5. checks: every submitted job (ids from snakemake's log) is COMPLETED with exit code 0:0 in
#      scontrol; the data and base outputs are byte-identical to the local run; the adapter
#      tensors and training losses are equal within 1e-5; a second dry-run has nothing to do
#   6. stop the daemons this script started, by PID
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-$REPO/.venv/bin/python}"
HERE="$REPO/tests/slurm"
TEST_CONFIG="$REPO/.test/config/config.yaml"
CTLD_PORT="${SLURM_TEST_CTLD_PORT:-16817}"
SLURMD_PORT="${SLURM_TEST_SLURMD_PORT:-16818}"

say() { echo "[slurm-test $(date +%H:%M:%S)] $*"; }
skip() { echo "[slurm-test] SKIPPED: $*"; exit 0; }
fail() { echo "[slurm-test] FAILED: $*" >&2; exit 1; }

# ------------------------------------------------------------------ 1. packages
[ -x "$PY" ] || fail "no Python at $PY (run 'make setup' first, or set PYTHON)"
if [ "$(id -u)" != 0 ]; then
    skip "not running as root: cannot install or start slurmctld/slurmd/munged"
fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
    command -v apt-get >/dev/null || skip "slurm is not installed and there is no apt-get to install it"
    say "installing slurmctld slurmd munge slurm-client (apt-get)"
    if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends slurmctld slurmd munge slurm-client) >/tmp/slurm-test-apt.log 2>&1; then
        tail -5 /tmp/slurm-test-apt.log
        skip "apt-get install slurmctld slurmd munge slurm-client failed (log: /tmp/slurm-test-apt.log)"
    fi
fi

WORK="$(mktemp -d /tmp/llama-pipe-slurm.XXXXXX)"
chmod 755 "$WORK"
STARTED_PIDS=()
WROTE_CONF=0
CONF_MARKER="written by llama-pipe tests/slurm/run_slurm_test.sh"

stop_daemons() {
    local pid
    for pid in "${STARTED_PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
    done
}
on_exit() {
    local rc=$?
    stop_daemons
    [ "$WROTE_CONF" = 1 ] && rm -f "$SYSTEM_CONF"
    if [ "$rc" != 0 ]; then
        for f in "$WORK"/log/*.log; do
            [ -f "$f" ] && { echo "---- $f (last 20 lines)"; tail -20 "$f"; }
        done
        echo "[slurm-test] work directory kept: $WORK"
    elif [ "${KEEP_WORK:-0}" = 1 ]; then
        echo "[slurm-test] work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap on_exit EXIT

# ------------------------------------------------------------------ 2. the cluster
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "munged already running; using it"
else
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    [ -s /etc/munge/munge.key ] || fail "/etc/munge/munge.key is missing (reinstall the munge package)"
    runuser -u munge -- /usr/sbin/munged
    STARTED_PIDS+=("$(cat /run/munge/munged.pid)")
    munge -n | unmunge >/dev/null || fail "munged started but does not answer"
    say "munged started (pid ${STARTED_PIDS[-1]})"
fi

# The config goes to /etc/slurm/slurm.conf: inside a job, snakemake's jobstep executor calls srun
# with every SLURM_* variable removed (SLURM_CONF included), so srun only finds the default path.
# A machine with its own slurm.conf is left alone.
SYSTEM_CONF=/etc/slurm/slurm.conf
if [ -e "$SYSTEM_CONF" ] && ! grep -q "$CONF_MARKER" "$SYSTEM_CONF"; then
    skip "$SYSTEM_CONF exists and is not this test's: not touching a real cluster's configuration"
fi
mkdir -p "$WORK/spool/ctld" "$WORK/spool/d" "$WORK/log" "$WORK/run" /etc/slurm
CPUS="$(nproc)"
MEM_MB="$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)"
sed -e "s|@WORK@|$WORK|g" -e "s|@CPUS@|$CPUS|g" -e "s|@MEM_MB@|$MEM_MB|g" \
    -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" \
    "$HERE/slurm.conf.in" >"$SYSTEM_CONF"
WROTE_CONF=1
export SLURM_CONF="$SYSTEM_CONF"

/usr/sbin/slurmctld -f "$SLURM_CONF"
for _ in $(seq 50); do [ -s "$WORK/run/slurmctld.pid" ] && break; sleep 0.1; done
STARTED_PIDS+=("$(cat "$WORK/run/slurmctld.pid")")
/usr/sbin/slurmd -f "$SLURM_CONF" -N localhost
for _ in $(seq 50); do [ -s "$WORK/run/slurmd.pid" ] && break; sleep 0.1; done
STARTED_PIDS+=("$(cat "$WORK/run/slurmd.pid")")
for _ in $(seq 60); do
    state="$(sinfo -h -n localhost -o %T 2>/dev/null | head -1 || true)"
    [ "$state" = idle ] && break
    sleep 0.5
done
[ "$state" = idle ] || fail "node localhost is '${state:-unknown}', not idle, 30 s after slurmd started"
say "cluster up: slurmctld pid ${STARTED_PIDS[-2]}, slurmd pid ${STARTED_PIDS[-1]}; $CPUS CPUs, $MEM_MB MB"
sinfo

# ------------------------------------------------------------------ 3. local run
copy_workflow() {
    mkdir -p "$1"
    local name
    # what tests/workflow/workflow_helpers.py's WORKFLOW_FILES names
    for name in Snakefile config.yaml workflow envs profiles data configs; do
        cp -r "$REPO/$name" "$1/"
    done
}
VENV_BIN="$(dirname "$PY")"
export PATH="$VENV_BIN:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
RUN_NAME="$("$PY" -c 'import sys, yaml; c = yaml.safe_load(open(sys.argv[1])); print(((c or {}).get("train") or {}).get("run", "default"))' "$REPO/config.yaml")"
TRAIN_TARGET="results/$RUN_NAME/train"

copy_workflow "$WORK/local"
say "local run of the whole DAG (profiles/default)"
# shellcheck disable=SC2086 # LOCAL_TARGETS is a list of targets
(cd "$WORK/local" && "$PY" -m snakemake --profile profiles/default --cores "$CPUS" \
    --configfile "$TEST_CONFIG" -- ${LOCAL_TARGETS:-} >"$WORK/log/local-snakemake.log" 2>&1) \
    || { tail -40 "$WORK/log/local-snakemake.log"; fail "the local run failed"; }
grep -E "^[0-9]+ of [0-9]+ steps \(100%\) done" "$WORK/log/local-snakemake.log"
# shellcheck disable=SC2086
(cd "$WORK/local" && "$PY" -m snakemake --profile profiles/default -n --configfile "$TEST_CONFIG" -- ${LOCAL_TARGETS:-} 2>&1) \
    | grep -q "Nothing to be done" || fail "a second local run would re-run jobs"
say "local: second run has nothing to do"
if [ -z "${LOCAL_TARGETS:-}" ]; then
    (cd "$WORK/local" && "$PY" -m snakemake --report "$WORK/report.html" --configfile "$TEST_CONFIG" \
        >"$WORK/log/local-report.log" 2>&1) || { tail -20 "$WORK/log/local-report.log"; fail "snakemake --report failed"; }
    pngs="$(cd "$WORK/local/results/$RUN_NAME/report" && ls -- *.png)"
    [ -n "$pngs" ] || fail "results/$RUN_NAME/report has no PNG plots"
    for png in $pngs; do
        grep -q "Adding $png" "$WORK/log/local-report.log" || fail "snakemake --report did not embed $png"
    done
    say "local: snakemake --report embeds" $pngs
    # A partial re-run plan on the real stages' metadata: filter_lang and what follows only (the
    # stages reading its outputs, from the registry: workflow_helpers.rerun_plan).
    plans="$WORK/log/plans"
    mkdir -p "$plans"
    (cd "$WORK/local" && "$PY" -m snakemake --profile profiles/default -n --forceall --configfile "$TEST_CONFIG" 2>&1) \
        >"$plans/full.txt"
    (cd "$WORK/local" && "$PY" -m snakemake --profile profiles/default -n --configfile "$TEST_CONFIG" \
        --config 'filter_lang={"keep": ["en"]}' 2>&1) >"$plans/changed.txt"
    read -r plan want < <("$PY" -c '
import sys
sys.path.insert(0, sys.argv[1])
from workflow_helpers import job_counts, rerun_plan
def show(plan): return ",".join(f"{rule}={n}" for rule, n in sorted(plan.items()))
full, changed = (job_counts(open(f, encoding="utf-8").read()) for f in sys.argv[2:4])
print(show(changed), show(rerun_plan("filter-lang", full)))' "$REPO/tests/workflow" "$plans/full.txt" "$plans/changed.txt")
    [ -n "$want" ] && [ "$plan" = "$want" ] || fail "changing filter_lang.keep plans '$plan', expected '$want'"
    say "local: changing filter_lang.keep re-runs only $plan"
fi

# ------------------------------------------------------------------ 4. SLURM run
copy_workflow "$WORK/slurm"
# The shipped profile, changed only where this node must differ: no GPUs, memory and threads
# capped at the node's (the partitions, set-resources blocks and other options stay as shipped).
"$PY" "$HERE/derive_profile.py" "$WORK/slurm/profiles/slurm/config.yaml" "$WORK/slurm/profiles/slurm-ci/config.yaml" \
    --mem-mb "$MEM_MB" --cpus "$CPUS"
say "SLURM run of the whole DAG (profiles/slurm-ci, derived from profiles/slurm):"
diff "$WORK/slurm/profiles/slurm/config.yaml" "$WORK/slurm/profiles/slurm-ci/config.yaml" || true
(cd "$WORK/slurm" && "$PY" -m snakemake --profile profiles/slurm-ci --jobs 4 \
    --slurm-init-seconds-before-status-checks 1 --seconds-between-status-checks 2 --slurm-keep-successful-logs \
    --configfile "$TEST_CONFIG" >"$WORK/log/slurm-snakemake.log" 2>&1) \
    || { tail -60 "$WORK/log/slurm-snakemake.log"; fail "the SLURM run failed"; }
for rule in merge_adapter eval report; do
    grep -qE "^rule $rule:" "$WORK/log/slurm-snakemake.log" || fail "rule $rule did not run on SLURM"
done
grep -E "submitted with SLURM jobid|steps \(100%\) done" "$WORK/log/slurm-snakemake.log"

# ------------------------------------------------------------------ 5. checks
JOB_IDS="$(grep -oE "submitted with SLURM jobid [0-9]+" "$WORK/log/slurm-snakemake.log" | awk '{print $NF}')"
EXPECTED_JOBS=$(grep -cE "^(rule|checkpoint) " "$WORK/log/slurm-snakemake.log" || true)
[ -n "$JOB_IDS" ] || fail "no sbatch job ids in the snakemake log"
n_ids=$(echo "$JOB_IDS" | wc -l)
[ "$n_ids" = "$EXPECTED_JOBS" ] || fail "$EXPECTED_JOBS jobs planned but $n_ids submitted"
say "job states (scontrol):"
bad=0
for id in $JOB_IDS; do
    info="$(scontrol -o show job "$id")"
    state="$(grep -oE "JobState=[A-Z_]+" <<<"$info" | cut -d= -f2)"
    code="$(grep -oE " ExitCode=[0-9:]+" <<<"$info" | cut -d= -f2)"
    rule="$(grep -oE "Comment=rule_[A-Za-z0-9_]+" <<<"$info" | sed -e 's/Comment=rule_//' -e 's/_wildcards.*//')"
    printf '  jobid %-5s %-14s %-10s exit %s\n' "$id" "$rule" "$state" "$code"
    [ "$state" = COMPLETED ] && [ "$code" = 0:0 ] || bad=1
done
[ "$bad" = 0 ] || fail "not every SLURM job reached COMPLETED with exit code 0:0"
say "all $n_ids SLURM jobs COMPLETED"

"$PY" "$HERE/compare_runs.py" "$WORK/local" "$WORK/slurm" --run "$RUN_NAME" \
    || fail "the SLURM outputs differ from the local run"

(cd "$WORK/slurm" && "$PY" -m snakemake --profile profiles/slurm-ci -n --configfile "$TEST_CONFIG" \
    2>&1) | grep -q "Nothing to be done" \
    || fail "a second SLURM run would re-run jobs"
say "SLURM: second run has nothing to do"
say "PASSED"
