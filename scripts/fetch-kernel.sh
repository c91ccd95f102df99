#!/bin/sh
# fetch-kernel.sh [DIR] — cache Debian's cloud kernel (linux-image-cloud-amd64)
# for the QEMU driver and print the path of its vmlinuz.
#
# Idempotent: when DIR already holds the kernel of the package version apt
# currently resolves to, nothing is downloaded. DIR defaults to
# /var/cache/hyphae/kernels, outside the repository, so CI can cache it.
# Layout (the same one kernel.FetchDebian writes):
#   DIR/vmlinuz-<version>   the bzImage
#   DIR/config-<version>    its build config
#   DIR/vmlinuz             symlink to the newest vmlinuz-<version>
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

if [ ! -s "$target" ]; then
	mkdir -p "$dir"
	work=$(mktemp -d "$dir/.fetch.XXXXXX")
	# apt downloads as the unprivileged _apt user where it can.
	chmod 755 "$work"
	trap 'rm -rf "$work"' EXIT INT TERM
	(cd "$work" && apt-get download -qq "$pkg" >&2)
	dpkg -x "$work"/"$pkg"_*.deb "$work/x"
	cp "$work/x/boot/config-$version" "$dir/config-$version"
	# Rename last, so an interrupted run never leaves a truncated kernel
	# under the final name.
	mv "$work/x/boot/vmlinuz-$version" "$target"
fi
ln -sfn "vmlinuz-$version" "$dir/vmlinuz"
echo "$target"
