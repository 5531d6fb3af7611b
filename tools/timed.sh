#!/usr/bin/env bash
# tools/timed.sh LOG STAGE COMMAND [ARGS...]
#
# Runs COMMAND, prints its wall time and the machine's 1-minute load average before and after,
# and appends one tab-separated row to LOG: run, stage, started (UTC), seconds, exit status,
# load before, load after, command. `qcap report` turns LOG into the per-stage timing table.
# The run id is $QCAP_RUN (set once per `make demo`), so rows of a resumed demo stay apart.
# Exits with COMMAND's status; an interrupted command (Ctrl-C, SIGKILL) leaves no row.
set -u
if [ $# -lt 3 ]; then
  echo "usage: $0 LOG STAGE COMMAND [ARGS...]" >&2
  exit 2
fi
log=$1 stage=$2
shift 2
load() { cut -d' ' -f1 /proc/loadavg; }
load_start=$(load)
started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
t0=$(date +%s.%N)
echo "[demo] ${stage}: $*  (load ${load_start})" >&2
"$@"
status=$?
t1=$(date +%s.%N)
load_end=$(load)
seconds=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
mkdir -p "$(dirname "$log")"
printf '%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\n' "${QCAP_RUN:-}" "$stage" "$started" "$seconds" "$status" \
  "$load_start" "$load_end" "$*" >> "$log"
echo "[demo] ${stage}: ${seconds} s, exit ${status}, load ${load_start} -> ${load_end}" >&2
exit "$status"
