#!/usr/bin/env bash
# dimension-demo.sh — dimension's main job on embedded defaults (SQLite store,
# embedded NATS): start the gateway, register the echo bundle, run it once
# in a microVM (QEMU under software emulation where KVM does not work) and
# print its Server-Sent Events stream. Expects `make build` and `make deps`
# to have run (`make demo` does both).
#
#   DEMO_DIR   where the demo keeps its data (default: a fresh temp dir)
#   DEMO_PORT  gateway port on 127.0.0.1 (default 3917)
#   DIMENSION_MOCK=true  run the bundle as a host process instead (no VMM)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$PWD/bin
dir=${DEMO_DIR:-$(mktemp -d /tmp/dimension-demo.XXXXXX)}
port=${DEMO_PORT:-3917}
kernel=${DIMENSION_KERNEL_PATH:-/var/cache/hyphae/kernels/vmlinuz}
token=dim_demo_$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
url=http://127.0.0.1:$port
auth=(-H "Authorization: Bearer $token")

for b in hyphae hyphae-init dimension-agent dimension-server; do
  [ -x "$bin/$b" ] || { echo "demo: $bin/$b missing; run make build" >&2; exit 1; }
done

echo "== building the echo bundle (examples/echo-go) with dimension-agent" >&2
image=$("$bin/hyphae" --home "$dir/hyphae" build examples/echo-go --name echo --with-agent --json | jq -r .path)

echo "== starting dimension-server on $url (data in $dir)" >&2
DIMENSION_HOST=127.0.0.1 DIMENSION_PORT=$port DIMENSION_DATA_DIR="$dir/dimension" \
DIMENSION_KERNEL_PATH=$kernel DIMENSION_TOKEN=$token \
  "$bin/dimension-server" >"$dir/server.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  curl -fsS "$url/health" >/dev/null 2>&1 && break
  kill -0 $server 2>/dev/null || { cat "$dir/server.log" >&2; exit 1; }
  sleep 0.1
done
curl -fsS "$url/health" | jq -c . >&2

echo "== pushing the bundle image" >&2
curl -fsS "${auth[@]}" -F "file=@$image" -F name=echo -F tag=latest "$url/bundles/push" | jq -c . >&2

echo "== POST /run (async)" >&2
run=$(curl -fsS "${auth[@]}" -H 'Content-Type: application/json' \
  -d '{"bundle_id":"echo:latest","mode":"async","payload":{"message":"hello from the demo"}}' "$url/run")
echo "$run" | jq -c . >&2
events=$(echo "$run" | jq -r .events_url)

echo "== GET $events" >&2
curl -fsS -N "${auth[@]}" "$url$events"
