#!/usr/bin/env bash
# demo.sh — hyphae's main job in one go: build examples/hello-go into an
# image with the freshly built bin/hyphae, register Debian's cloud kernel
# and run the image in a microVM, printing the program's output.
#
# Needs `make build` (bin/hyphae, bin/hyphae-init) and `make deps` (QEMU and
# the kernel in /var/cache/hyphae/kernels). Data goes to $HYPHAE_HOME, else a
# demo directory that is removed afterwards; set HYPHAE_DEMO_KEEP=1 to keep it.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${BIN:-bin}
kernel=${HYPHAE_DEMO_KERNEL:-/var/cache/hyphae/kernels/vmlinuz}
for f in "$bin/hyphae" "$bin/hyphae-init"; do
	[ -x "$f" ] || { echo "demo: $f is missing; run 'make build' first" >&2; exit 1; }
done
[ -e "$kernel" ] || { echo "demo: no kernel at $kernel; run 'make deps' (scripts/fetch-kernel.sh)" >&2; exit 1; }

if [ -z "${HYPHAE_HOME:-}" ]; then
	HYPHAE_HOME=$(mktemp -d /tmp/hyphae-demo-XXXXXX)
	export HYPHAE_HOME
	if [ -z "${HYPHAE_DEMO_KEEP:-}" ]; then
		trap 'rm -rf "$HYPHAE_HOME"' EXIT
	fi
fi
hyphae() { "$bin/hyphae" "$@"; }

echo "== hyphae kernel add $kernel"
hyphae kernel add "$kernel"
echo
echo "== hyphae check (which VMM --vmm auto picks, and why)"
hyphae check || true
echo
echo "== hyphae build examples/hello-go"
hyphae build examples/hello-go --name hello-go
echo
echo "== hyphae run hello-go --env GREETING='hello from the demo'"
status=0
hyphae run hello-go --env "GREETING=hello from the demo" || status=$?
echo "(exit code $status)"
echo
echo "== hyphae list vms (nothing is left running)"
hyphae list vms
exit "$status"
