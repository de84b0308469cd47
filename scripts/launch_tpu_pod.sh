#!/usr/bin/env bash
# Run `tml train cluster=tpu_pod [overrides]` on every host of a Cloud TPU VM pod slice.
#
#   scripts/launch_tpu_pod.sh --tpu NAME --zone ZONE [--project PROJECT] [--repo DIR]
#                             [--dry-run] [--] [tml train overrides ...]
#
# Runs, from a workstation with gcloud:
#
#   gcloud compute tpus tpu-vm ssh NAME --zone=ZONE [--project=PROJECT] --worker=all \
#     --command "cd DIR && .venv/bin/tml train cluster=tpu_pod <overrides>"
#
# Every host runs the same command, one process per host; JAX finds the other hosts from
# the TPU VM metadata (recipes/cluster/tpu_pod.yaml). DIR is the checkout of this
# repository on each host, relative to the home directory unless absolute (default: tml),
# with jax[tpu] installed in its .venv. --dry-run prints the command instead of running it.
#
# Example:
#   scripts/launch_tpu_pod.sh --tpu my-v5p-64 --zone us-east5-a -- \
#     +experiment=tml_interaction_small_tpu train.run_dir=/mnt/gcs/runs/tis
set -euo pipefail

usage() {
  sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

tpu="" zone="" project="" repo="tml" dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) tpu="${2:?--tpu needs a value}"; shift 2 ;;
    --tpu=*) tpu="${1#*=}"; shift ;;
    --zone) zone="${2:?--zone needs a value}"; shift 2 ;;
    --zone=*) zone="${1#*=}"; shift ;;
    --project) project="${2:?--project needs a value}"; shift 2 ;;
    --project=*) project="${1#*=}"; shift ;;
    --repo) repo="${2:?--repo needs a value}"; shift 2 ;;
    --repo=*) repo="${1#*=}"; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage ;;
    --) shift; break ;;
    -*) echo "launch_tpu_pod.sh: unknown option $1" >&2; usage ;;
    *) break ;;                      # the first override
  esac
done
[[ -n "$tpu" && -n "$zone" ]] || { echo "launch_tpu_pod.sh: --tpu and --zone are required" >&2; usage; }

# one word for a POSIX shell: as is when safe, else in single quotes
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    local sq="'" esc="'\\''"
    printf "'%s'" "${1//$sq/$esc}"
  fi
}

# the command each host runs; every word quoted for the remote shell
remote="cd $(quote "$repo") && .venv/bin/tml train cluster=tpu_pod"
for arg in "$@"; do
  remote+=" $(quote "$arg")"
done

cmd=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone")
[[ -n "$project" ]] && cmd+=("--project=$project")
cmd+=(--worker=all --command "$remote")

if (( dry_run )); then
  line=""
  for word in "${cmd[@]}"; do line+="${line:+ }$(quote "$word")"; done
  printf '%s\n' "$line"
else
  exec "${cmd[@]}"
fi
