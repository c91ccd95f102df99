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
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/hyphae-run/hyphae/archive/archivetest"
	"github.com/hyphae-run/hyphae/errcode"
)

// fuzzLimits keep fuzzed inputs from filling the disk.
var fuzzLimits = Limits{MaxEntrySize: 1 << 20, MaxTotalSize: 4 << 20, MaxEntries: 1000, MaxLayers: 8}

var discard = slog.New(slog.DiscardHandler)

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }

func jsonMarshal(t testing.TB, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// readMembers returns the regular members of an outer tar.
func readMembers(t testing.TB, p string) map[string][]byte {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string][]byte{}
	tr := tar.NewReader(f)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		if hdr.Typeflag == tar.TypeReg {
			b, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			out[hdr.Name] = b
		}
	}
}

func writeMembers(t testing.TB, p string, members map[string][]byte) {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	names := make([]string, 0, len(members))
	for n := range members {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: n, Mode: 0o644, Size: int64(len(members[n]))}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(members[n]); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}

// seedSpecs are the layer sets whose archives and layer blobs seed the
// fuzzers: the full tree and some hostile shapes.
func seedSpecs() [][][]archivetest.Entry {
	return [][][]archivetest.Entry{
		treeLayers(),
		{{{Name: "a", Type: '2', Linkname: "/tmp"}, {Name: "a/f", Body: "x"}}},
		{{{Name: "../x", Body: "x"}, {Name: "h", Type: '1', Linkname: "../x"}}},
		{{{Name: "d/", Mode: 0o500}, {Name: "d/.wh..wh..opq"}, {Name: "d/.wh...", Body: "x"}}},
		{{{Name: "big", DeclaredSize: 1 << 40}}},
	}
}

func hexSum(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// FuzzUnpack feeds fuzzed bytes as a single layer and as a whole archive.
// Neither may panic, return an uncoded error or touch anything outside dest.
func FuzzUnpack(f *testing.F) {
	dir := f.TempDir()
	for i, layers := range seedSpecs() {
		for _, gz := range []bool{false, true} {
			p := filepath.Join(dir, "seed.tar")
			if err := archivetest.Write(p, archivetest.Spec{Layout: archivetest.OCI, Layers: layers, Gzip: gz}); err != nil {
				f.Fatal(err)
			}
			for name, b := range readMembers(f, p) {
				if strings.HasPrefix(name, "blobs/") {
					f.Add(b)
				}
			}
			if i > 0 { // the tree archive is large; its layers are seeds already
				whole, err := os.ReadFile(p)
				if err != nil {
					f.Fatal(err)
				}
				f.Add(whole)
			}
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		ctx := context.Background()
		// As a layer, with a matching diff ID so that valid tars succeed.
		s := newSandbox(t)
		root, err := os.OpenRoot(s.dest)
		if err != nil {
			t.Fatal(err)
		}
		a := newApplier(root, fuzzLimits, discard)
		a.layer = 1
		err = a.applyLayer(ctx, bytes.NewReader(data), v1.Hash{Algorithm: "sha256", Hex: hexSum(data)})
		if err == nil {
			err = a.finish()
		}
		root.Close()
		if err != nil && errcode.CodeOf(err) == "" {
			t.Errorf("uncoded error: %v", err)
		}
		s.check(t)

		// As an archive.
		s = newSandbox(t)
		p := filepath.Join(s.base, "image.tar")
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := openAndUnpackQuiet(p, s.dest); err != nil && errcode.CodeOf(err) == "" {
			t.Errorf("uncoded error: %v", err)
		}
		s.check(t, "image.tar")
	})
}

func openAndUnpackQuiet(p, dest string) error {
	im, err := Open(context.Background(), p, Options{Limits: fuzzLimits, Logger: discard})
	if err != nil {
		return err
	}
	return im.Unpack(context.Background(), dest, nil)
}

// FuzzOpen fuzzes the documents Open parses: the classic manifest.json
// (kind 0), index.json (1), an image manifest reached from a valid index
// (2) and the image config reached from a valid manifest (3). Whatever
// opens must also unpack safely.
func FuzzOpen(f *testing.F) {
	dir := f.TempDir()
	layers := [][]archivetest.Entry{{{Name: "etc/hostname", Body: "x"}}, {{Name: "etc/.wh.hostname"}}}
	classicPath, ociPath := filepath.Join(dir, "classic.tar"), filepath.Join(dir, "oci.tar")
	if err := archivetest.Write(classicPath, archivetest.Spec{Layout: archivetest.Classic, Layers: layers, Config: testConfig}); err != nil {
		f.Fatal(err)
	}
	if err := archivetest.Write(ociPath, archivetest.Spec{Layout: archivetest.OCI, Nested: true, Layers: layers, Config: testConfig}); err != nil {
		f.Fatal(err)
	}
	classic, oci := readMembers(f, classicPath), readMembers(f, ociPath)
	f.Add(uint8(0), classic["manifest.json"])
	f.Add(uint8(1), oci["index.json"])
	var cfgName string
	for name, b := range oci {
		var probe struct {
			MediaType string `json:"mediaType"`
			RootFS    any    `json:"rootfs"`
		}
		if json.Unmarshal(b, &probe) != nil {
			continue
		}
		switch {
		case probe.MediaType != "":
			f.Add(uint8(1), b) // an index as index.json
			f.Add(uint8(2), b) // or a manifest as the manifest
		case probe.RootFS != nil:
			cfgName = name
			f.Add(uint8(3), b)
		}
	}
	// The manifest that names the real layers, for kind 3.
	var baseManifest v1.Manifest
	for _, b := range oci {
		var m v1.Manifest
		if json.Unmarshal(b, &m) == nil && len(m.Layers) == len(layers) && m.Config.Digest.Hex == strings.TrimPrefix(cfgName, "blobs/sha256/") {
			baseManifest = m
		}
	}
	if len(baseManifest.Layers) == 0 {
		f.Fatal("no base manifest among the seed blobs")
	}
	f.Fuzz(func(t *testing.T, kind uint8, data []byte) {
		var members map[string][]byte
		blob := func(b []byte) v1.Hash {
			h := v1.Hash{Algorithm: "sha256", Hex: hexSum(b)}
			members["blobs/sha256/"+h.Hex] = b
			return h
		}
		index := func(manifest []byte) []byte {
			return jsonMarshal(t, v1.IndexManifest{SchemaVersion: 2, Manifests: []v1.Descriptor{
				{MediaType: "application/vnd.oci.image.manifest.v1+json", Size: int64(len(manifest)), Digest: blob(manifest)},
			}})
		}
		switch kind % 4 {
		case 0:
			members = maps.Clone(classic)
			members["manifest.json"] = data
		case 1:
			members = maps.Clone(oci)
			members["index.json"] = data
		case 2:
			members = maps.Clone(oci)
			members["index.json"] = index(data)
		case 3:
			members = maps.Clone(oci)
			m := baseManifest
			m.Config.Digest, m.Config.Size = blob(data), int64(len(data))
			members["index.json"] = index(jsonMarshal(t, m))
		}
		s := newSandbox(t)
		p := filepath.Join(s.base, "image.tar")
		writeMembers(t, p, members)
		im, err := Open(context.Background(), p, Options{Limits: fuzzLimits, Logger: discard})
		if err != nil {
			if errcode.CodeOf(err) == "" {
				t.Errorf("uncoded error: %v", err)
			}
			return
		}
		_ = im.Config()
		if err := im.Unpack(context.Background(), s.dest, nil); err != nil && errcode.CodeOf(err) == "" {
			t.Errorf("uncoded error: %v", err)
		}
		s.check(t, "image.tar")
	})
}
