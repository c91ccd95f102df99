#!/usr/bin/env bash
# Installs what hyphae's tests and demo need on a fresh Debian 12 machine:
# e2fsprogs (mkfs.ext4, debugfs), QEMU for real boots, nftables and iproute2
# for networking tests, PostgreSQL for the store tests, curl and jq for the
# demo, Node.js and Rust for the examples, and the Debian cloud
# kernel (cached outside the repository by scripts/fetch-kernel.sh). The
# Firecracker-style test kernel is built separately (make fc-kernel).
# Idempotent: a second run installs nothing.
set -euo pipefail
pkgs=(e2fsprogs qemu-system-x86 qemu-utils nftables iproute2 util-linux postgresql nats-server bzip2 xz-utils zstd curl jq)
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
# Rust builds the Rust example (the tests require it): rustup's toolchain
# when the machine has one, else Debian's cargo (which brings gcc and the
# static glibc that +crt-static links against).
if ! command -v cargo >/dev/null && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
  echo "installing: cargo" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends cargo libc6-dev >/dev/null
fi
# The test kernel: Debian's cloud kernel, cached outside the repository.
"$(dirname "$0")/fetch-kernel.sh" "${HYPHAE_KERNEL_CACHE:-/var/cache/hyphae/kernels}" >/dev/null
