// Package archivetest writes `docker save` archives for tests: the classic
// layout and the OCI layout of Docker ≥ 25, with any layers, including
// hostile ones. Layers are streamed through temp files next to the output,
// so large archives do not sit in memory.
package archivetest

import (
	"archive/tar"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"hash"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Layout selects the archive layout.
type Layout int

// The layouts docker save writes.
const (
	Classic Layout = iota // manifest.json + <id>/layer.tar (Docker ≤ 24)
	OCI                   // index.json + oci-layout + blobs/sha256/<hex>
)

// Spec describes an archive.
type Spec struct {
	Layout Layout
	Layers [][]Entry // bottom first
	Config v1.Config // Entrypoint, Cmd, Env, WorkingDir, User
	Gzip   bool      // gzip every layer
	// DockerManifest (OCI only) also writes manifest.json pointing into
	// blobs/, as Docker ≥ 25 does.
	DockerManifest bool
	// Nested (OCI only) makes index.json point to an image index holding
	// the linux/amd64 manifest, an arm64 manifest whose blobs are absent and
	// an attestation manifest, as containerd's image store saves them.
	Nested bool
}

// Entry is one layer entry.
type Entry struct {
	Name string
	// Type is a tar type flag; 0 means a regular file, or a directory when
	// Name ends in "/".
	Type byte
	// Mode holds permission bits; 0 means 0644 for files, 0755 for
	// directories, 0777 for symlinks.
	Mode int64
	Body string
	// RandomSize, when > 0, makes the file RandomBytes(Name, RandomSize)
	// instead of Body (large, incompressible, not held in memory).
	RandomSize int64
	// DeclaredSize, when > 0, is written as the header size while only Body
	// follows, and the layer ends right there: a truncated, hostile entry.
	DeclaredSize       int64
	Linkname           string
	UID, GID           int
	ModTime            time.Time // zero → Epoch
	Devmajor, Devminor int64
}

// Epoch is the mtime of entries that set none.
var Epoch = time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)

// RandomBytes returns the deterministic content of an entry with RandomSize.
func RandomBytes(name string, size int64) io.Reader {
	seed := sha256.Sum256([]byte(name))
	return io.LimitReader(rand.NewChaCha8(seed), size)
}

// layerFile is one written layer blob.
type layerFile struct {
	path   string
	size   int64
	diffID string // hex sha256 of the uncompressed tar
	digest string // hex sha256 of the blob
}

// Write writes the archive described by spec to path.
func Write(path string, spec Spec) error {
	tmp, err := os.MkdirTemp(filepath.Dir(path), ".archivetest-*")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	var layers []layerFile
	for i, entries := range spec.Layers {
		l, err := writeLayer(filepath.Join(tmp, fmt.Sprint(i)), entries, spec.Gzip)
		if err != nil {
			return fmt.Errorf("layer %d: %w", i+1, err)
		}
		layers = append(layers, l)
	}
	cfg, err := configJSON(spec, layers)
	if err != nil {
		return err
	}
	out, err := os.Create(path)
	if err != nil {
		return err
	}
	tw := tar.NewWriter(out)
	if spec.Layout == Classic {
		err = writeClassic(tw, cfg, layers)
	} else {
		err = writeOCI(tw, spec, cfg, layers)
	}
	if err == nil {
		err = tw.Close()
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	return err
}

func writeLayer(path string, entries []Entry, gz bool) (layerFile, error) {
	f, err := os.Create(path)
	if err != nil {
		return layerFile{}, err
	}
	defer f.Close()
	blobHash, diffHash := sha256.New(), sha256.New()
	blob := io.MultiWriter(f, blobHash)
	var zw *gzip.Writer
	w := blob
	if gz {
		zw = gzip.NewWriter(blob)
		w = zw
	}
	tw := tar.NewWriter(io.MultiWriter(w, diffHash))
	truncated, err := writeEntries(tw, entries)
	if err != nil {
		return layerFile{}, err
	}
	if !truncated {
		if err := tw.Close(); err != nil {
			return layerFile{}, err
		}
	}
	if zw != nil {
		if err := zw.Close(); err != nil {
			return layerFile{}, err
		}
	}
	fi, err := f.Stat()
	if err != nil {
		return layerFile{}, err
	}
	return layerFile{path: path, size: fi.Size(), diffID: hexOf(diffHash), digest: hexOf(blobHash)}, nil
}

// writeEntries writes entries and reports whether a DeclaredSize entry cut
// the layer short.
func writeEntries(tw *tar.Writer, entries []Entry) (bool, error) {
	for _, e := range entries {
		hdr := header(e)
		if err := tw.WriteHeader(hdr); err != nil {
			return false, fmt.Errorf("%s: %w", e.Name, err)
		}
		var body io.Reader = strings.NewReader(e.Body)
		if e.RandomSize > 0 {
			body = RandomBytes(e.Name, e.RandomSize)
		}
		if _, err := io.Copy(tw, body); err != nil {
			return false, fmt.Errorf("%s: %w", e.Name, err)
		}
		if e.DeclaredSize > 0 {
			return true, nil
		}
	}
	return false, nil
}

func header(e Entry) *tar.Header {
	typ := e.Type
	if typ == 0 {
		typ = tar.TypeReg
		if strings.HasSuffix(e.Name, "/") {
			typ = tar.TypeDir
		}
	}
	mode := e.Mode
	if mode == 0 {
		switch typ {
		case tar.TypeDir:
			mode = 0o755
		case tar.TypeSymlink:
			mode = 0o777
		default:
			mode = 0o644
		}
	}
	mtime := e.ModTime
	if mtime.IsZero() {
		mtime = Epoch
	}
	hdr := &tar.Header{
		Typeflag: typ, Name: e.Name, Linkname: e.Linkname, Mode: mode,
		Uid: e.UID, Gid: e.GID, ModTime: mtime, Devmajor: e.Devmajor, Devminor: e.Devminor,
	}
	switch {
	case e.DeclaredSize > 0:
		hdr.Size = e.DeclaredSize
	case e.RandomSize > 0:
		hdr.Size = e.RandomSize
	case typ == tar.TypeReg:
		hdr.Size = int64(len(e.Body))
	}
	return hdr
}

func configJSON(spec Spec, layers []layerFile) ([]byte, error) {
	cf := v1.ConfigFile{
		Architecture: "amd64",
		OS:           "linux",
		Created:      v1.Time{Time: Epoch},
		Config:       spec.Config,
		RootFS:       v1.RootFS{Type: "layers"},
	}
	for _, l := range layers {
		cf.RootFS.DiffIDs = append(cf.RootFS.DiffIDs, v1.Hash{Algorithm: "sha256", Hex: l.diffID})
	}
	return json.Marshal(cf)
}

func writeClassic(tw *tar.Writer, cfg []byte, layers []layerFile) error {
	cfgName := sum(cfg) + ".json"
	paths := map[string]string{} // diff ID → first layer.tar, as docker save links repeats
	var layerPaths []string
	for i, l := range layers {
		id := sum([]byte(fmt.Sprint(l.diffID, i)))
		p := id + "/layer.tar"
		layerPaths = append(layerPaths, p)
		if err := addBytes(tw, id+"/VERSION", []byte("1.0")); err != nil {
			return err
		}
		if err := addBytes(tw, id+"/json", []byte(`{"id":"`+id+`"}`)); err != nil {
			return err
		}
		if first, ok := paths[l.diffID]; ok {
			hdr := &tar.Header{Typeflag: tar.TypeSymlink, Name: p, Linkname: "../" + first, Mode: 0o777, ModTime: Epoch}
			if err := tw.WriteHeader(hdr); err != nil {
				return err
			}
			continue
		}
		paths[l.diffID] = p
		if err := addFile(tw, p, l); err != nil {
			return err
		}
	}
	if err := addBytes(tw, cfgName, cfg); err != nil {
		return err
	}
	man, err := json.Marshal([]map[string]any{{"Config": cfgName, "RepoTags": []string{"hyphae-test:latest"}, "Layers": layerPaths}})
	if err != nil {
		return err
	}
	return addBytes(tw, "manifest.json", man)
}

func writeOCI(tw *tar.Writer, spec Spec, cfg []byte, layers []layerFile) error {
	layerType := types.OCIUncompressedLayer
	if spec.Gzip {
		layerType = types.OCILayer
	}
	man := v1.Manifest{
		SchemaVersion: 2,
		MediaType:     types.OCIManifestSchema1,
		Config:        v1.Descriptor{MediaType: types.OCIConfigJSON, Size: int64(len(cfg)), Digest: hashOf(cfg)},
	}
	written := map[string]bool{}
	for _, l := range layers {
		man.Layers = append(man.Layers, v1.Descriptor{MediaType: layerType, Size: l.size, Digest: v1.Hash{Algorithm: "sha256", Hex: l.digest}})
		if written[l.digest] {
			continue
		}
		written[l.digest] = true
		if err := addFile(tw, "blobs/sha256/"+l.digest, l); err != nil {
			return err
		}
	}
	if err := addBytes(tw, "blobs/sha256/"+sum(cfg), cfg); err != nil {
		return err
	}
	manJSON, err := json.Marshal(man)
	if err != nil {
		return err
	}
	if err := addBytes(tw, "blobs/sha256/"+sum(manJSON), manJSON); err != nil {
		return err
	}
	manDesc := v1.Descriptor{
		MediaType: types.OCIManifestSchema1, Size: int64(len(manJSON)), Digest: hashOf(manJSON),
		Annotations: map[string]string{"io.containerd.image.name": "docker.io/library/hyphae-test:latest", "org.opencontainers.image.ref.name": "latest"},
	}
	top := v1.IndexManifest{SchemaVersion: 2, MediaType: types.OCIImageIndex}
	if spec.Nested {
		nested, err := nestedIndex(tw, manDesc, cfg)
		if err != nil {
			return err
		}
		top.Manifests = []v1.Descriptor{nested}
	} else {
		top.Manifests = []v1.Descriptor{manDesc}
	}
	idx, err := json.Marshal(top)
	if err != nil {
		return err
	}
	if err := addBytes(tw, "oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)); err != nil {
		return err
	}
	if err := addBytes(tw, "index.json", idx); err != nil {
		return err
	}
	if !spec.DockerManifest {
		return nil
	}
	var layerPaths []string
	for _, l := range layers {
		layerPaths = append(layerPaths, "blobs/sha256/"+l.digest)
	}
	dm, err := json.Marshal([]map[string]any{{"Config": "blobs/sha256/" + sum(cfg), "RepoTags": []string{"hyphae-test:latest"}, "Layers": layerPaths}})
	if err != nil {
		return err
	}
	return addBytes(tw, "manifest.json", dm)
}

// nestedIndex writes an image index around the real manifest, with an
// arm64 manifest that is not in the archive and an attestation manifest
// that is, and returns its descriptor.
func nestedIndex(tw *tar.Writer, manDesc v1.Descriptor, cfg []byte) (v1.Descriptor, error) {
	manDesc.Platform = &v1.Platform{OS: "linux", Architecture: "amd64"}
	att := v1.Manifest{
		SchemaVersion: 2, MediaType: types.OCIManifestSchema1,
		Config: v1.Descriptor{MediaType: types.OCIConfigJSON, Size: int64(len(cfg)), Digest: hashOf(cfg)},
	}
	attJSON, err := json.Marshal(att)
	if err != nil {
		return v1.Descriptor{}, err
	}
	if err := addBytes(tw, "blobs/sha256/"+sum(attJSON), attJSON); err != nil {
		return v1.Descriptor{}, err
	}
	idx := v1.IndexManifest{SchemaVersion: 2, MediaType: types.OCIImageIndex, Manifests: []v1.Descriptor{
		{MediaType: types.OCIManifestSchema1, Size: 500, Digest: hashOf([]byte("absent arm64 manifest")),
			Platform: &v1.Platform{OS: "linux", Architecture: "arm64"}},
		manDesc,
		{MediaType: types.OCIManifestSchema1, Size: int64(len(attJSON)), Digest: hashOf(attJSON),
			Platform:    &v1.Platform{OS: "unknown", Architecture: "unknown"},
			Annotations: map[string]string{"vnd.docker.reference.type": "attestation-manifest"}},
	}}
	b, err := json.Marshal(idx)
	if err != nil {
		return v1.Descriptor{}, err
	}
	if err := addBytes(tw, "blobs/sha256/"+sum(b), b); err != nil {
		return v1.Descriptor{}, err
	}
	return v1.Descriptor{MediaType: types.OCIImageIndex, Size: int64(len(b)), Digest: hashOf(b)}, nil
}

func addBytes(tw *tar.Writer, name string, b []byte) error {
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(len(b)), ModTime: Epoch}); err != nil {
		return err
	}
	_, err := tw.Write(b)
	return err
}

func addFile(tw *tar.Writer, name string, l layerFile) error {
	f, err := os.Open(l.path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: l.size, ModTime: Epoch}); err != nil {
		return err
	}
	_, err = io.Copy(tw, f)
	return err
}

func hexOf(h hash.Hash) string { return hex.EncodeToString(h.Sum(nil)) }

func sum(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func hashOf(b []byte) v1.Hash { return v1.Hash{Algorithm: "sha256", Hex: sum(b)} }
