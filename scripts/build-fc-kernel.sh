#!/usr/bin/env bash
# build-fc-kernel.sh [DIR] — build (once) a Firecracker-style guest kernel and
# print the path of its ELF vmlinux.
#
# Source: Debian's linux-source-6.1; config: Firecracker's CI guest config
# (scripts/kernel-config, see SOURCE.md there). The result has virtio-mmio,
# virtio-blk, virtio-console and vsock built in, and neither NVMe nor a second
# UART: the tests boot it under QEMU to prove the qemu driver picks virtio
# devices for such kernels.
#
# Cached in DIR (default /var/cache/hyphae/kernels, outside the repository),
# keyed by the source package version and the config files' hashes:
#   DIR/vmlinux-fc-<version>-<key>   the ELF vmlinux
#   DIR/config-fc-<version>-<key>    its .config
#   DIR/vmlinux-fc                   symlink to the newest build
# Older builds are removed. A second run with the same inputs builds nothing. About 13 minutes on 2
# cores when it does build. Progress goes to stderr; stdout is only the path.
set -euo pipefail

dir=${1:-/var/cache/hyphae/kernels}
here=$(cd "$(dirname "$0")" && pwd)
configs=("$here/kernel-config/microvm-kernel-ci-x86_64-6.1.config" "$here/kernel-config/ci.config")
src_pkg=linux-source-6.1
build_pkgs=("$src_pkg" build-essential flex bison bc libelf-dev libssl-dev xz-utils)

build() {
  missing=()
  for p in "${build_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "build-fc-kernel: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi

  version=$(dpkg-query -W -f='${Version}' "$src_pkg")
  key=$(cat "${configs[@]}" | sha256sum | cut -c1-12)
  name=fc-$version-$key
  target=$dir/vmlinux-$name
  if [ ! -s "$target" ]; then
    tarball=$(ls /usr/src/linux-source-6.1.tar.* | head -n 1)
    mkdir -p "$dir"
    work=$(mktemp -d "$dir/.build.XXXXXX")
    trap 'rm -rf "$work"' EXIT INT TERM
    echo "build-fc-kernel: building $name in $work (about 13 minutes on 2 cores)"
    tar -xf "$tarball" -C "$work"
    tree=$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -n 1)
    cat "${configs[@]}" >"$tree/.config"
    make -C "$tree" -s olddefconfig
    make -C "$tree" -s -j"$(nproc)" vmlinux
    cp "$tree/.config" "$dir/config-$name"
    # Rename last: a half-built kernel never looks finished.
    mv "$tree/vmlinux" "$target"
  fi
  ln -sfn "vmlinux-$name" "$dir/vmlinux-fc"
  # Builds from older sources or configs (45 MB each) are not kept.
  for old in "$dir"/vmlinux-fc-* "$dir"/config-fc-*; do
    case "$old" in
      "$target" | "$dir/config-$name") ;;
      *) [ -e "$old" ] && rm -f "$old" ;;
    esac
  done
}
# Progress and the tools' output go to stderr; stdout is only the path.
build >&2
echo "$target"
