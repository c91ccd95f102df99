#!/bin/sh
# fetch-kernel.sh [DIR] — cache Debian's cloud kernel (linux-image-cloud-amd64)
# and its modules for the QEMU driver and print the path of its vmlinuz.
#
# Idempotent: when DIR already holds the kernel and the modules of the
# package version apt currently resolves to, nothing is downloaded. DIR
# defaults to /var/cache/hyphae/kernels, outside the repository, so CI can
# cache it.
# Layout (the same one kernel.FetchDebian writes):
#   DIR/vmlinuz-<version>   the bzImage
#   DIR/config-<version>    its build config
#   DIR/modules-<version>/  the package's lib/modules/<version> tree
#                           (kernel/..., modules.order; Debian ships no
#                           modules.dep, depmod makes it on install):
#                           kernel.ModulesImage packs virtio_net from it
#   DIR/vmlinuz             symlink to the newest vmlinuz-<version>
#   DIR/modules             symlink to the newest modules-<version>
# Tests find it through HYPHAE_TEST_KERNEL or DIR/vmlinuz.
set -eu

dir=${1:-/var/cache/hyphae/kernels}
meta=linux-image-cloud-amd64

resolve() {
	apt-cache depends "$meta" 2>/dev/null |
		sed -n 's/.*Depends: \(linux-image-[^ ]*\)/\1/p' | head -n 1
}

pkg=$(resolve)
if [ -z "$pkg" ]; then
	# Fresh machines have no package lists yet.
	apt-get update -qq >&2
	pkg=$(resolve)
fi
if [ -z "$pkg" ]; then
	echo "fetch-kernel: apt cannot resolve $meta" >&2
	exit 1
fi
version=${pkg#linux-image-}
target=$dir/vmlinuz-$version
modules=$dir/modules-$version

if [ ! -s "$target" ] || [ ! -s "$modules/modules.order" ]; then
	mkdir -p "$dir"
	work=$(mktemp -d "$dir/.fetch.XXXXXX")
	# apt downloads as the unprivileged _apt user where it can.
	chmod 755 "$work"
	trap 'rm -rf "$work"' EXIT INT TERM
	(cd "$work" && apt-get download -qq "$pkg" >&2)
	dpkg -x "$work"/"$pkg"_*.deb "$work/x"
	cp "$work/x/boot/config-$version" "$dir/config-$version"
	# Renames come last, so an interrupted run never leaves a truncated
	# kernel or a partial modules tree under its final name.
	if [ ! -s "$modules/modules.order" ]; then
		rm -rf "$modules"
		mv "$work/x/lib/modules/$version" "$modules"
	fi
	if [ ! -s "$target" ]; then
		mv "$work/x/boot/vmlinuz-$version" "$target"
	fi
fi
ln -sfn "vmlinuz-$version" "$dir/vmlinuz"
ln -sfn "modules-$version" "$dir/modules"
echo "$target"
