// Package rootfs turns a staged directory tree into an ext4 image file with
// `mkfs.ext4 -d`: no loop mounts, no root needed.
//
// It has four jobs, used in this order by package image:
//
//  1. WriteHyphaeFiles puts hyphae's own files into the tree (/sbin/init,
//     optionally /sbin/dimension-agent, /etc/hyphae/{entrypoint,env,workdir}
//     and an /etc/resolv.conf placeholder) without ever letting a symlink
//     shipped by the image redirect a write (see WriteHyphaeFiles).
//  2. Measure and PlanSize derive the filesystem size and inode count from
//     the tree.
//  3. TreeDigest names the result by its content.
//  4. MakeExt4 runs mkfs.ext4.
//
// # Sizing rule
//
// Measure counts what mkfs.ext4 will allocate for the tree, in 4 KiB blocks:
// every non-empty regular file takes ceil(size/4096) blocks (a hard-linked
// file is counted once), a symlink whose target is 60 bytes or longer takes
// one block (shorter ones live in the inode), a directory takes
// ceil(1.5 × Σ(8 + name length rounded up to 4) / 4096) blocks, at least one
// (the factor covers half-full leaf and index blocks of hashed directories).
// Every entry, the root included, takes one inode.
//
// PlanSize then sets
//
//	inodes  = ceil(1.25 × entries) + 1024
//	journal = 4 MiB below 256 MiB of data, 16 MiB below 1 GiB, else 64 MiB
//	minimum = data × 1.05 + inodes × 256 B + journal + 2 % + 4 MiB
//	size    = max(16 MiB, data × 1.2 + inodes × 256 B + journal + 2 % + 4 MiB)
//
// rounded up to whole MiB. The 2 % + 4 MiB stand for group descriptors,
// bitmaps, reserved GDT blocks and extent-tree blocks; the reserved-for-root
// share is set to 0 (-m 0) because nothing in an image needs it. An explicit
// size (--size MiB) replaces the computed size but must not be below the
// minimum, else the error is E406 (SizeLimit). The image file is sparse, so
// the slack costs little disk.
//
// # What the digest covers
//
// TreeDigest hashes, for every entry of the tree in sorted path order: its
// relative path, its type, its permission bits (setuid, setgid and sticky
// included), its owner uid and gid, its extended attributes, and by type:
// the size, SHA-256 of the content and modification time (whole seconds) of
// a regular file, the first path of its inode when it is a hard link to an
// entry seen earlier, the target of a symlink, the device number of a device
// node. The caller adds a salt naming everything else that shapes the image
// (the mkfs parameters from MkfsOptions.Params and FormatVersion).
//
// Directory and symlink mtimes are not covered: staging a tree bumps them as a
// side effect (writing /sbin/init touches /sbin), so covering them would make
// every build a cache miss without describing anything a program sees.
// Regular-file mtimes are covered because archives carry them on purpose and
// because MakeExt4 copies them into the image; package image fixes them to
// Epoch for project builds so that those stay cacheable. Inode change times
// (ctime) cannot be set from user space, so two builds of the same digest
// differ in those bytes of the inode tables and are equal in everything else.
package rootfs
