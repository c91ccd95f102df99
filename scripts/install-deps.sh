#!/usr/bin/env bash
# Installs what hyphae's tests and demo need on a fresh Debian 12 machine:
# e2fsprogs (mkfs.ext4, debugfs), QEMU for real boots, nftables and iproute2
# for networking tests, PostgreSQL for the store tests, and the Debian cloud
# kernel (cached outside the repository by scripts/fetch-kernel.sh), and a
# Firecracker-style kernel built once from Firecracker's CI config
# (scripts/build-fc-kernel.sh, cached there too; ~11 minutes the first time).
# Idempotent: a second run installs nothing.
set -euo pipefail
pkgs=(e2fsprogs qemu-system-x86 qemu-utils nftables iproute2 util-linux postgresql nats-server bzip2 xz-utils zstd)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Node.js builds and tests the JavaScript example and SDK; the machine image
# usually ships one, Debian's is enough otherwise.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "installing: nodejs npm" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
# The test kernel: Debian's cloud kernel, cached outside the repository.
"$(dirname "$0")/fetch-kernel.sh" "${HYPHAE_KERNEL_CACHE:-/var/cache/hyphae/kernels}" >/dev/null
# The Firecracker-style test kernel: virtio devices built in, for the qemu
# driver's virtio path. Built from Debian's linux-source, cached likewise.
"$(dirname "$0")/build-fc-kernel.sh" "${HYPHAE_KERNEL_CACHE:-/var/cache/hyphae/kernels}" >/dev/null
