#!/usr/bin/env bash
# Create (or update) the work pools prefect.yaml deploys to. Safe to re-run.
# Needs only a Prefect API (PREFECT_API_URL or a profile) — no AWS access.
#
#   magg-process  process pool: process-cycle and watch-cycles runs (light
#                 orchestration) on whatever machine runs its worker
#   magg-ecs      ECS pool: one Fargate task per cell (process-cell), with the
#                 job template in deployments/ecs/base-job-template.json
#
# MAGG_CELL_POOL_TYPE=process creates magg-ecs as a process pool instead: the
# ECS code path (one child flow run per cell) on a local worker, for a trial
# without AWS and for the tests.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

prefect work-pool create magg-process --type process --overwrite
case "${MAGG_CELL_POOL_TYPE:-ecs}" in
  ecs)
    prefect work-pool create magg-ecs --type ecs --overwrite \
      --base-job-template "$here/ecs/base-job-template.json"
    ;;
  process)
    prefect work-pool create magg-ecs --type process --overwrite
    ;;
  *)
    echo "MAGG_CELL_POOL_TYPE must be 'ecs' or 'process', not '$MAGG_CELL_POOL_TYPE'" >&2
    exit 2
    ;;
esac
