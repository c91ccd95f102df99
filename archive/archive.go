// Package archive reads `docker save` archives and unpacks their layers into
// a staging directory, safely.
//
// Both layouts are read: the classic one (manifest.json naming a config file
// and per-layer `<id>/layer.tar` members) and the OCI image layout that
// Docker ≥ 25 writes (index.json, possibly pointing to a nested index, and
// blobs/sha256/<hex>). When index.json is present it is used; manifest.json
// is used otherwise. Layers may be uncompressed, gzip or bzip2, detected by
// their magic bytes rather than by name or media type.
//
// The archive is never loaded into memory: Open scans the outer tar once,
// remembering where each member's data starts, and Unpack reads each layer
// through an io.SectionReader over the file.
//
// Integrity: the image config's SHA-256 is Digest(); in the OCI layout it
// must match the manifest's descriptor. Every layer's uncompressed SHA-256
// must match the config's rootfs.diff_ids, so the digest identifies the whole
// image content (a cache keyed on it cannot be fooled by swapped layers).
//
// Safety rules of Unpack (all writes go through an os.Root on dest, so even a
// bug in these checks cannot reach outside it):
//   - An entry name with a ".." component, or an absolute name, is refused
//     with errcode.UnsafeArchiveEntry (E404). Docker would re-root absolute
//     names; no image builder writes them, so they are treated as hostile.
//     A leading "./" is stripped, as tar -C dir . writes it.
//   - Nothing is written, created or deleted through a symlink: an entry whose
//     parent path contains a symlink is refused with E404 (Docker would
//     follow it within the root; refusing is simpler to reason about).
//     Symlinks themselves may point anywhere: their targets are only stored.
//   - A hardlink's target must be an existing non-directory inside dest,
//     reached without symlinks: outside or through a symlink → E404, missing
//     → errcode.MalformedArchive (E405).
//   - Declared sizes are checked against Limits before any content is read
//     (errcode.SizeLimit, E406); so are entry and layer counts.
//   - Whiteouts: `.wh.<name>` removes name from lower layers (a name of "."
//     or ".." is refused with E404); `.wh..wh..opq` removes the directory's
//     lower contents but keeps what the same layer adds; other `.wh..wh.`
//     names (aufs metadata) are skipped.
//
// Metadata: permissions (including setuid, setgid, sticky) and mtimes are
// preserved on every entry kind, symlinks included; directory modes and times
// are applied after all layers so that read-only directories can still be
// filled. Ownership (Lchown) needs root; without it every file belongs to the
// caller. FIFOs are created; character and block devices are skipped with a
// debug log even as root (hyphae-init mounts devtmpfs on /dev, and a device
// node in a host-side staging tree would be a hole). Extended attributes are
// not applied.
package archive

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"os"
	"path"
	"slices"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/hyphae-run/hyphae/errcode"
)

// Defaults used for zero fields of Limits.
const (
	DefaultMaxEntrySize int64 = 8 << 30  // 8 GiB for one file
	DefaultMaxTotalSize int64 = 32 << 30 // 32 GiB of file content over all layers
	DefaultMaxEntries         = 1 << 20  // 1M entries over all layers
	DefaultMaxLayers          = 256
)

// maxJSONSize bounds the manifest, index and config documents, which are read
// into memory whole.
const maxJSONSize = 16 << 20

// maxIndexDepth bounds how far nested image indexes are followed.
const maxIndexDepth = 4

// maxLinkHops bounds symlinks between outer members (classic docker save
// links a repeated layer to its first copy).
const maxLinkHops = 8

// Limits bounds what an archive may declare. A zero field takes its default.
type Limits struct {
	MaxEntrySize int64 // largest regular file, by declared size
	MaxTotalSize int64 // sum of declared file sizes over all layers
	MaxEntries   int   // entries over all layers
	MaxLayers    int   // layers in the image; the outer tar may hold outerMembers(MaxLayers) members
}

// outerMembers bounds the outer tar's member count, which grows with the
// layer count (classic layout: 3 members per layer; OCI: a blob per layer,
// more for multi-platform saves) and not with the layers' entries.
func outerMembers(maxLayers int) int { return 16*maxLayers + 64 }

func (l Limits) withDefaults() Limits {
	if l.MaxEntrySize <= 0 {
		l.MaxEntrySize = DefaultMaxEntrySize
	}
	if l.MaxTotalSize <= 0 {
		l.MaxTotalSize = DefaultMaxTotalSize
	}
	if l.MaxEntries <= 0 {
		l.MaxEntries = DefaultMaxEntries
	}
	if l.MaxLayers <= 0 {
		l.MaxLayers = DefaultMaxLayers
	}
	return l
}

// Options configure Open.
type Options struct {
	Limits Limits
	Logger *slog.Logger // nil → slog.Default()
}

// Config is the part of the image config that running the image needs.
type Config struct {
	Entrypoint, Cmd, Env []string
	WorkingDir, User     string
}

// Image is an opened archive: its config and where its layers are. It holds
// no open file; Unpack re-opens the archive and checks it did not change.
type Image struct {
	path    string
	size    int64
	modTime time.Time
	layers  []member
	diffIDs []v1.Hash
	config  Config
	digest  string
	limits  Limits
	log     *slog.Logger
}

// member locates one outer-tar member: either data at offset, or a link to
// another member.
type member struct {
	name   string
	offset int64
	size   int64
	link   string // cleaned target name when the member is a symlink or hardlink
}

// Config returns the image's run configuration.
func (im *Image) Config() Config {
	c := im.config
	c.Entrypoint = slices.Clone(c.Entrypoint)
	c.Cmd = slices.Clone(c.Cmd)
	c.Env = slices.Clone(c.Env)
	return c
}

// Digest returns "sha256:<hex>" of the image config, which names the layers
// by their verified uncompressed digests and so identifies the image content.
func (im *Image) Digest() string { return im.digest }

// Layers returns the number of layers.
func (im *Image) Layers() int { return len(im.layers) }

// Open reads the archive's manifest and image config. path is a tar file on
// disk; it is scanned once here and re-read per layer by Unpack, never
// loaded whole into memory.
func Open(ctx context.Context, path string, opts Options) (*Image, error) {
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	limits := opts.Limits.withDefaults()
	f, err := os.Open(path)
	if err != nil {
		return nil, errcode.Wrap(errcode.MalformedArchive, err, "cannot open image archive")
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, errcode.Wrap(errcode.MalformedArchive, err, "cannot stat image archive %s", path)
	}
	if !fi.Mode().IsRegular() {
		return nil, errcode.New(errcode.MalformedArchive, "image archive %s is not a regular file", path).
			WithHint("to read from a pipe, spool it to a file first (hyphae import - does this)")
	}
	s := &scan{f: f, members: map[string]member{}}
	if err := s.index(ctx, outerMembers(limits.MaxLayers)); err != nil {
		return nil, err
	}
	im := &Image{path: path, size: fi.Size(), modTime: fi.ModTime(), limits: limits, log: log}
	var configBlob []byte
	if _, ok := s.members["index.json"]; ok {
		configBlob, err = s.readOCI(im)
	} else if _, ok := s.members["manifest.json"]; ok {
		configBlob, err = s.readClassic(im)
	} else {
		err = errcode.New(errcode.MalformedArchive, "%s has neither manifest.json nor index.json", path).
			WithHint("expected the output of `docker save`")
	}
	if err != nil {
		return nil, err
	}
	if len(im.layers) > limits.MaxLayers {
		return nil, errcode.New(errcode.SizeLimit, "image has %d layers, more than the limit of %d", len(im.layers), limits.MaxLayers)
	}
	if err := im.parseConfig(configBlob); err != nil {
		return nil, err
	}
	log.Debug("opened image archive", "path", path, "digest", im.digest, "layers", len(im.layers))
	return im, nil
}

// scan is the index of an outer tar's members.
type scan struct {
	f       *os.File
	members map[string]member
}

// index reads every outer header once, recording where data starts. The
// tar reader reads exactly the header blocks from f and skips data by
// seeking, so f's offset after Next is the member's data offset.
func (s *scan) index(ctx context.Context, maxMembers int) error {
	tr := tar.NewReader(s.f)
	for n := 0; ; n++ {
		if err := ctx.Err(); err != nil {
			return errcode.Wrap(errcode.StagingFailed, err, "reading image archive cancelled")
		}
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return errcode.Wrap(errcode.MalformedArchive, err, "image archive is not a valid tar")
		}
		if n >= maxMembers {
			return errcode.New(errcode.SizeLimit, "image archive has more than %d members", maxMembers)
		}
		name := cleanOuter(hdr.Name)
		switch hdr.Typeflag {
		case tar.TypeReg:
			if isSparse(hdr) {
				return errcode.New(errcode.MalformedArchive, "image archive member %q is a sparse file", hdr.Name)
			}
			off, err := s.f.Seek(0, io.SeekCurrent)
			if err != nil {
				return errcode.Wrap(errcode.MalformedArchive, err, "cannot locate member %q", hdr.Name)
			}
			s.members[name] = member{name: name, offset: off, size: hdr.Size}
		case tar.TypeSymlink:
			s.members[name] = member{name: name, link: cleanOuter(path.Join(path.Dir(name), hdr.Linkname))}
		case tar.TypeLink:
			s.members[name] = member{name: name, link: cleanOuter(hdr.Linkname)}
		case tar.TypeGNUSparse:
			return errcode.New(errcode.MalformedArchive, "image archive member %q is a sparse file", hdr.Name)
		}
	}
}

func isSparse(hdr *tar.Header) bool {
	for k := range hdr.PAXRecords {
		if strings.HasPrefix(k, "GNU.sparse.") {
			return true
		}
	}
	return false
}

// cleanOuter normalizes an outer member name so that "./manifest.json" and
// "manifest.json" are the same key. Outer names are only looked up, never
// written, so no safety check is needed here.
func cleanOuter(name string) string {
	return strings.TrimPrefix(path.Clean("/"+name), "/")
}

// lookup returns the data member for name, following member links.
func (s *scan) lookup(name string) (member, error) {
	name = cleanOuter(name)
	for range maxLinkHops {
		m, ok := s.members[name]
		if !ok {
			return member{}, errcode.New(errcode.MalformedArchive, "image archive has no member %q", name)
		}
		if m.link == "" {
			return m, nil
		}
		name = m.link
	}
	return member{}, errcode.New(errcode.MalformedArchive, "image archive member %q: too many links", name)
}

// readJSON reads a small member whole, bounded by maxJSONSize.
func (s *scan) readJSON(name string) ([]byte, error) {
	m, err := s.lookup(name)
	if err != nil {
		return nil, err
	}
	if m.size > maxJSONSize {
		return nil, errcode.New(errcode.SizeLimit, "image archive member %q is %d bytes, more than %d", name, m.size, maxJSONSize)
	}
	b := make([]byte, m.size)
	if _, err := s.f.ReadAt(b, m.offset); err != nil {
		return nil, errcode.Wrap(errcode.MalformedArchive, err, "reading image archive member %q", name)
	}
	return b, nil
}

// classicManifest is one entry of a classic docker save manifest.json.
type classicManifest struct {
	Config   string
	RepoTags []string
	Layers   []string
}

func (s *scan) readClassic(im *Image) ([]byte, error) {
	b, err := s.readJSON("manifest.json")
	if err != nil {
		return nil, err
	}
	var ms []classicManifest
	if err := json.Unmarshal(b, &ms); err != nil {
		return nil, errcode.Wrap(errcode.MalformedArchive, err, "manifest.json is not valid")
	}
	switch {
	case len(ms) == 0:
		return nil, errcode.New(errcode.MalformedArchive, "manifest.json lists no image")
	case len(ms) > 1:
		return nil, errcode.New(errcode.MalformedArchive, "archive holds %d images; hyphae imports one", len(ms)).
			WithHint("save a single image: docker save IMAGE -o FILE")
	}
	if ms[0].Config == "" {
		return nil, errcode.New(errcode.MalformedArchive, "manifest.json names no config")
	}
	for _, l := range ms[0].Layers {
		m, err := s.lookup(l)
		if err != nil {
			return nil, err
		}
		im.layers = append(im.layers, m)
	}
	return s.readJSON(ms[0].Config)
}

// blobName maps a descriptor digest to its path in the OCI layout.
func blobName(h v1.Hash) (string, error) {
	if h.Algorithm != "sha256" {
		return "", errcode.New(errcode.MalformedArchive, "unsupported digest algorithm %q", h.Algorithm)
	}
	return "blobs/sha256/" + h.Hex, nil
}

// readBlob reads a small blob and checks its digest.
func (s *scan) readBlob(h v1.Hash) ([]byte, error) {
	name, err := blobName(h)
	if err != nil {
		return nil, err
	}
	b, err := s.readJSON(name)
	if err != nil {
		return nil, err
	}
	if sum := sha256.Sum256(b); hex.EncodeToString(sum[:]) != h.Hex {
		return nil, errcode.New(errcode.MalformedArchive, "blob %s does not match its digest", h)
	}
	return b, nil
}

func (s *scan) hasBlob(h v1.Hash) bool {
	name, err := blobName(h)
	if err != nil {
		return false
	}
	_, err = s.lookup(name)
	return err == nil
}

func (s *scan) readOCI(im *Image) ([]byte, error) {
	b, err := s.readJSON("index.json")
	if err != nil {
		return nil, err
	}
	idx, err := v1.ParseIndexManifest(bytes.NewReader(b))
	if err != nil {
		return nil, errcode.Wrap(errcode.MalformedArchive, err, "index.json is not valid")
	}
	var cands []v1.Descriptor
	if err := s.collect(idx, 0, &cands); err != nil {
		return nil, err
	}
	desc, err := pickManifest(cands)
	if err != nil {
		return nil, err
	}
	mb, err := s.readBlob(desc.Digest)
	if err != nil {
		return nil, err
	}
	man, err := v1.ParseManifest(bytes.NewReader(mb))
	if err != nil {
		return nil, errcode.Wrap(errcode.MalformedArchive, err, "image manifest %s is not valid", desc.Digest)
	}
	for _, l := range man.Layers {
		name, err := blobName(l.Digest)
		if err != nil {
			return nil, err
		}
		m, err := s.lookup(name)
		if err != nil {
			return nil, err
		}
		im.layers = append(im.layers, m)
	}
	return s.readBlob(man.Config.Digest)
}

// collect gathers the image manifests an index reaches, following nested
// indexes, skipping attestation manifests and manifests whose blob the
// archive does not hold (a single-platform save of a multi-platform image).
func (s *scan) collect(idx *v1.IndexManifest, depth int, out *[]v1.Descriptor) error {
	if depth > maxIndexDepth {
		return errcode.New(errcode.MalformedArchive, "image indexes nested more than %d deep", maxIndexDepth)
	}
	for _, d := range idx.Manifests {
		switch {
		case d.MediaType.IsIndex():
			b, err := s.readBlob(d.Digest)
			if err != nil {
				return err
			}
			child, err := v1.ParseIndexManifest(bytes.NewReader(b))
			if err != nil {
				return errcode.Wrap(errcode.MalformedArchive, err, "image index %s is not valid", d.Digest)
			}
			if err := s.collect(child, depth+1, out); err != nil {
				return err
			}
		case d.MediaType.IsImage():
			if d.Annotations["vnd.docker.reference.type"] == "attestation-manifest" ||
				(d.Platform != nil && d.Platform.OS == "unknown") || !s.hasBlob(d.Digest) {
				continue
			}
			if !slices.ContainsFunc(*out, func(o v1.Descriptor) bool { return o.Digest == d.Digest }) {
				*out = append(*out, d)
			}
		}
	}
	return nil
}

// pickManifest chooses the single manifest, else the linux/amd64 one.
func pickManifest(cands []v1.Descriptor) (v1.Descriptor, error) {
	if len(cands) == 1 {
		return cands[0], nil
	}
	for _, d := range cands {
		if d.Platform != nil && d.Platform.OS == "linux" && d.Platform.Architecture == "amd64" {
			return d, nil
		}
	}
	if len(cands) == 0 {
		return v1.Descriptor{}, errcode.New(errcode.MalformedArchive, "index.json reaches no image manifest whose blob is in the archive")
	}
	return v1.Descriptor{}, errcode.New(errcode.MalformedArchive, "archive holds %d images and none is linux/amd64", len(cands)).
		WithHint("save a single image, or one with a linux/amd64 variant")
}

// parseConfig reads the image config and checks it matches the layers.
func (im *Image) parseConfig(b []byte) error {
	sum := sha256.Sum256(b)
	im.digest = "sha256:" + hex.EncodeToString(sum[:])
	cf, err := v1.ParseConfigFile(bytes.NewReader(b))
	if err != nil {
		return errcode.Wrap(errcode.MalformedArchive, err, "image config is not valid")
	}
	if cf.OS != "" && cf.OS != "linux" {
		return errcode.New(errcode.MalformedArchive, "image is for %s, not linux", cf.OS)
	}
	if len(cf.RootFS.DiffIDs) != len(im.layers) {
		return errcode.New(errcode.MalformedArchive, "image config lists %d layer digests but the manifest %d layers",
			len(cf.RootFS.DiffIDs), len(im.layers))
	}
	for _, d := range cf.RootFS.DiffIDs {
		if d.Algorithm != "sha256" {
			return errcode.New(errcode.MalformedArchive, "unsupported layer digest %s", d)
		}
	}
	im.diffIDs = cf.RootFS.DiffIDs
	c := cf.Config
	im.config = Config{Entrypoint: c.Entrypoint, Cmd: c.Cmd, Env: c.Env, WorkingDir: c.WorkingDir, User: c.User}
	return nil
}
