#!/usr/bin/env bash
# The main job on the embedded pool. Until every stage exists, this runs the longest real path
# that exists and says which stages are not built yet.
set -euo pipefail
cd "$(dirname "$0")"
QCAP=.venv/bin/qcap
echo "qcap demo: stages built so far:"
$QCAP --help | sed -n '/^commands:/,/^$/p'
echo "not built yet: world, download, filters, caption, build-dr, subsets, train, finetune, report"
