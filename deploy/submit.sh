#!/usr/bin/env bash
# Submit a training run to an existing Ray cluster (for example k8s/raycluster.yaml).
#
#   kubectl port-forward svc/orchestrator-head-svc 8265:8265 &     # the dashboard stays in-cluster
#   export RAY_ADDRESS=http://127.0.0.1:8265
#   export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=~/.ray/orchestrator.token   # token-auth clusters
#   STORAGE=s3://<bucket>/runs deploy/submit.sh                    # extra args go to `orchestrator run`
#   STORAGE=s3://<bucket>/runs RUN_NAME=digits-4w deploy/submit.sh --num-workers 4
#
# Environment: RAY_ADDRESS (required), STORAGE (required), TARGET (default examples/digits.py),
# RUN_NAME (default digits), EPOCHS (default 30). The same STORAGE + RUN_NAME resumes a run; a run
# that already finished exits 0 at once, so resubmitting is always safe.
#
# Exit code: `ray job submit` follows the job's logs and exits 1 when the job fails (checked with
# Ray 2.60); the job's own code is in the final "Status message: Job entrypoint command failed with
# exit code N" line: `orchestrator run`'s 0 finished, 75 preempted (submit the same command again),
# 1 failed, 2 bad arguments.
#
# Stopping a run gracefully: `ray job stop --address "$RAY_ADDRESS" <submission-id>` sends SIGTERM
# to the driver, which makes every rank stop at the same step and commit an emergency backup, then
# sends SIGKILL after RAY_JOB_STOP_WAIT_TIME_S seconds. Ray's default is 3 s, far too short for the
# trainer's preemption_grace_s (120 s): deploy/runtime_env.yaml sets RAY_JOB_STOP_WAIT_TIME_S=150
# for every job submitted with this script (the head pods of k8s/*.yaml set it too).
set -euo pipefail

: "${RAY_ADDRESS:?set RAY_ADDRESS to the Ray dashboard URL, e.g. http://127.0.0.1:8265}"
: "${STORAGE:?set STORAGE to the run storage URL, e.g. s3://<bucket>/runs}"
TARGET="${TARGET:-examples/digits.py}"
RUN_NAME="${RUN_NAME:-digits}"
EPOCHS="${EPOCHS:-30}"

# Ray's job client sends the token only when RAY_AUTH_MODE=token (checked with Ray 2.60: a token
# in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token alone gets "401 Unauthorized").
if [[ -z "${RAY_AUTH_MODE:-}" && ( -n "${RAY_AUTH_TOKEN:-}" || -n "${RAY_AUTH_TOKEN_PATH:-}" ) ]]; then
  export RAY_AUTH_MODE=token
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.."   # the repository root is the job's working dir

exec ray job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env deploy/runtime_env.yaml \
  -- orchestrator run "$TARGET" --storage "$STORAGE" --run-name "$RUN_NAME" --epochs "$EPOCHS" "$@"
