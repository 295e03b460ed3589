#!/usr/bin/env bash
# Serve a run through vLLM's Ray executor on a one-node Ray cluster, load it, stop it with SIGTERM; then the same
# load on the plain server (vLLM's default executor). BENCHMARKS.md, "Serving over a Ray cluster".
#   bash tools/ray_serve_check.sh RUN [MODEL_NAME_OF_THE_BASE]     (ray, CUDA vLLM and lorapipe importable)
# The load: 512 chat requests, 64 at a time, half to the run's adapter, 128 generated tokens each (ignore_eos).
# Lines go to stdout; the servers' own output to ./ray-check-*.txt and the run's logs/serve.log.
set -u
RUN=${1:?usage: tools/ray_serve_check.sh RUN [BASE_NAME]}
NAME=$(basename "$RUN"); BASE=${2:-smollm2-135m}
RAY=(python -c 'import sys; from ray.scripts.scripts import main; sys.argv[0] = "ray"; sys.exit(main())')
LOAD=$(mktemp --suffix .py)
cat > "$LOAD" <<'PY'
import concurrent.futures as cf, json, sys, time, urllib.request
label, adapter, base = sys.argv[1:4]
def one(i):
    body = json.dumps({"model": adapter if i % 2 else base, "max_tokens": 128, "temperature": 0, "ignore_eos": True,
                       "messages": [{"role": "user", "content": f"Write function number {i}."}]}).encode()
    req = urllib.request.Request("http://127.0.0.1:8000/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())["usage"]["completion_tokens"]
t = time.perf_counter()
with cf.ThreadPoolExecutor(64) as ex:
    toks = list(ex.map(one, range(512)))
dt = time.perf_counter() - t
print(f"{label}: 512 requests (half to {adapter}), 64 at a time: {sum(toks)} tokens in {dt:.1f} s = {sum(toks)/dt:.0f} tokens/s")
PY
serve_and_load() {  # $1: label; the rest: lorapipe serve flags
  local label=$1; shift
  local t0; t0=$(date +%s%N)
  python -m lorapipe serve "$RUN" "$@" > "ray-check-$label.txt" 2>&1 &
  local sp=$! ok=0
  for _ in $(seq 400); do
    curl -s -m 2 127.0.0.1:8000/health > /dev/null && { ok=1; break; }
    kill -0 $sp 2> /dev/null || break  # the server exited: say so now, not after the wait
    sleep 1
  done
  echo "$label: ready=$ok after $(( ($(date +%s%N) - t0) / 1000000 )) ms"
  [ $ok = 1 ] && timeout -k 5 150 python "$LOAD" "$label" "$NAME" "$BASE"
  local t1; t1=$(date +%s%N)
  kill -TERM $sp; wait $sp
  echo "$label: exit $? after SIGTERM in $(( ($(date +%s%N) - t1) / 1000000 )) ms; last line: $(tail -1 "ray-check-$label.txt")"
}
timeout -k 5 90 "${RAY[@]}" start --head --disable-usage-stats > /dev/null 2>&1 || { echo "ray start failed"; exit 1; }
serve_and_load ray --serve.ray_cluster true
grep -c "RayWorkerProc" "$RUN/logs/serve.log" | sed 's/^/ray: log lines from the Ray worker: /'
timeout -k 5 60 "${RAY[@]}" stop > /dev/null 2>&1
serve_and_load plain
rm -f "$LOAD"
