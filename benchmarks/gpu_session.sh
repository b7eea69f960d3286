#!/usr/bin/env bash
# One device call's worth of verification, in priority order, each step under its own time limit so
# that a slow step cannot eat the whole call (the GPU suite alone ran past 9 minutes once).
#   PYTHONPATH=. bash benchmarks/gpu_session.sh OUT_DIR [STEP ...]   (on the GPU machine, repo root)
# Steps: gpu-forward gpu-backward bench-forward bench-backward bench-lowrank bench-lowrank-8k startup host
# doc-rebuild proto-ws
# ab-loads ab-table-grads ab-stored-grads suite
# (default: all, up to ~25 minutes: name a subset to stay inside one 10-minute device call). Logs go
# to OUT_DIR; the suite's JSON to OUT_DIR/suite (copy it to docs/benchmarks/ and run
# `suite.py report docs/benchmarks` where matplotlib is installed). A summary is printed last.
# Time limits: GPU_FORWARD_LIMIT, GPU_BACKWARD_LIMIT, STARTUP_LIMIT, SUITE_LIMIT (seconds);
# SUITE_ARGS: the suite's options (default --shapes 4x16x8192x128: every variant, both passes).
set -u
out=${1:-${OUT:-gpu-session}}
shift $(( $# > 0 ? 1 : 0 ))
wanted=" $* "
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:-.}
summary=()
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  if [ "$wanted" != "  " ] && [[ "$wanted" != *" $name "* ]]; then return; fi
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-22s rc=%-4s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$(tail -n 1 "$out/$name.log")")")
}
step gpu-forward "${GPU_FORWARD_LIMIT:-240}" python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py
step gpu-backward "${GPU_BACKWARD_LIMIT:-330}" python3 -m pytest -m gpu -q -p no:cacheprovider --durations=5 tests/test_gpu_backward.py
step bench-forward 200 python3 benchmarks/bench_forward.py --out "$out/fwd"
step bench-backward 200 python3 benchmarks/bench_backward.py --out "$out/bwd"
step bench-lowrank 90 python3 benchmarks/bench_lowrank.py
step bench-lowrank-8k 300 python3 benchmarks/bench_lowrank.py --seq-len 8192 --backward  # (#5's shape)
step startup "${STARTUP_LIMIT:-120}" python3 benchmarks/startup.py
step host 120 python3 benchmarks/host_overhead.py
step doc-rebuild 150 python3 benchmarks/doc_rebuild.py --profile
step proto-ws 150 python3 benchmarks/proto_ws_forward.py
step ab-table-grads "${AB_TABLE_LIMIT:-270}" python3 benchmarks/ab_table_grads.py
step ab-stored-grads "${AB_STORED_LIMIT:-200}" python3 benchmarks/ab_stored_grads.py
step ab-loads 300 python3 benchmarks/ab_loads.py --variants full,causal,sliding,document,alibi_causal,dense_bias
# SUITE_ARGS picks the suite's shapes/variants/passes (default: the first shape, both passes)
step suite "${SUITE_LIMIT:-300}" python3 benchmarks/suite.py run --out "$out/suite" ${SUITE_ARGS:---shapes 4x16x8192x128}
printf '%s\n' "${summary[@]}"
