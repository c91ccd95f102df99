package storetest

import (
	"reflect"
	"strings"
	"testing"

	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/errcode"
)

func testBundles(t *testing.T, s store.Store) {
	ctx := t.Context()
	u := newUser(t, s, "owner", store.RoleUser)
	m := store.Manifest{BootTimeoutSecs: 20, ProcessingTimeoutSecs: 90, VCPUs: 2, MemoryMiB: 512,
		Entrypoint: []string{"/bin/echo", "", "two words"}}
	b := must(s.PutBundle(ctx, store.Bundle{Owner: u.ID, Name: "echo", Tag: "v1", ImageDigest: digest("a1"),
		Manifest: m, SizeBytes: 1 << 20}))(t)
	if !strings.HasPrefix(b.ID, store.BundleIDPrefix) || b.Owner != u.ID || b.Ref() != "echo:v1" ||
		b.ImageDigest != digest("a1") || b.SizeBytes != 1<<20 || !reflect.DeepEqual(b.Manifest, m) ||
		b.CreatedAt.IsZero() || !b.UpdatedAt.Equal(b.CreatedAt) {
		t.Fatalf("PutBundle = %+v", b)
	}
	latest := newBundle(t, s, u.ID, "echo", "", "a2")
	if latest.Tag != "latest" {
		t.Fatalf("empty tag stored as %q, want latest", latest.Tag)
	}
	other := newBundle(t, s, u.ID, "alpha", "latest", "a3")

	for _, ref := range []string{b.ID, "echo:v1"} {
		if got := must(s.GetBundle(ctx, u.ID, ref))(t); !reflect.DeepEqual(got, b) {
			t.Fatalf("GetBundle(%q) = %+v, want %+v", ref, got, b)
		}
	}
	for _, ref := range []string{"echo", "echo:latest", latest.ID} {
		if got := must(s.GetBundle(ctx, u.ID, ref))(t); got.ID != latest.ID {
			t.Fatalf("GetBundle(%q) = %s, want %s", ref, got.Ref(), latest.Ref())
		}
	}
	list := must(s.ListBundles(ctx, u.ID))(t)
	var refs []string
	for _, x := range list {
		refs = append(refs, x.Ref())
	}
	if want := []string{"alpha:latest", "echo:latest", "echo:v1"}; !reflect.DeepEqual(refs, want) {
		t.Fatalf("ListBundles = %v, want %v", refs, want)
	}

	for _, ref := range []string{"echo:v2", "missing", "bnd_missing"} {
		_, err := s.GetBundle(ctx, u.ID, ref)
		wantCode(t, err, errcode.NotFound, "GetBundle("+ref+")")
	}
	for _, ref := range []string{"", "Echo", "echo:", "echo:v1:x", "../echo", "echo:-v"} {
		_, err := s.GetBundle(ctx, u.ID, ref)
		wantCode(t, err, errcode.InvalidName, "GetBundle("+ref+")")
	}

	del := must(s.DeleteBundle(ctx, u.ID, "echo:v1"))(t)
	if del.ID != b.ID {
		t.Fatalf("DeleteBundle returned %+v, want %+v", del, b)
	}
	_, err := s.GetBundle(ctx, u.ID, b.ID)
	wantCode(t, err, errcode.NotFound, "GetBundle after delete")
	_, err = s.DeleteBundle(ctx, u.ID, "echo:v1")
	wantCode(t, err, errcode.NotFound, "second delete")
	must(s.DeleteBundle(ctx, u.ID, other.ID))(t)
	if got := must(s.ListBundles(ctx, u.ID))(t); len(got) != 1 || got[0].ID != latest.ID {
		t.Fatalf("ListBundles after deletes = %+v", got)
	}
}

func testBundleTagMove(t *testing.T, s store.Store) {
	ctx := t.Context()
	u := newUser(t, s, "mover", store.RoleUser)
	v1 := newBundle(t, s, u.ID, "app", "v1", "b1")
	first := newBundle(t, s, u.ID, "app", "latest", "b1")
	moved := must(s.PutBundle(ctx, store.Bundle{Owner: u.ID, Name: "app", Tag: "latest", ImageDigest: digest("b2"),
		Manifest: store.Manifest{VCPUs: 4}, SizeBytes: 8192}))(t)
	if moved.ID != first.ID || moved.ImageDigest != digest("b2") || moved.Manifest.VCPUs != 4 || moved.SizeBytes != 8192 {
		t.Fatalf("moved tag = %+v, want id %s with the new digest, manifest and size", moved, first.ID)
	}
	if !moved.CreatedAt.Equal(first.CreatedAt) || moved.UpdatedAt.Before(first.UpdatedAt) {
		t.Fatalf("times after move: created %v → %v, updated %v → %v", first.CreatedAt, moved.CreatedAt, first.UpdatedAt, moved.UpdatedAt)
	}
	if got := must(s.GetBundle(ctx, u.ID, "app"))(t); !reflect.DeepEqual(got, moved) {
		t.Fatalf("GetBundle after move = %+v, want %+v", got, moved)
	}
	if got := must(s.GetBundle(ctx, u.ID, "app:v1"))(t); !reflect.DeepEqual(got, v1) {
		t.Fatalf("the other tag changed: %+v, want %+v", got, v1)
	}
	if got := must(s.ListBundles(ctx, u.ID))(t); len(got) != 2 {
		t.Fatalf("ListBundles after move = %+v, want 2 tags", got)
	}
}

func testBundleValidation(t *testing.T, s store.Store) {
	ctx := t.Context()
	u := newUser(t, s, "validator", store.RoleUser)
	good := store.Bundle{Owner: u.ID, Name: "ok", Tag: "v1", ImageDigest: digest("c1"), SizeBytes: 1}
	tests := []struct {
		name string
		edit func(*store.Bundle)
		code errcode.Code
	}{
		{"uppercase name", func(b *store.Bundle) { b.Name = "OK" }, errcode.InvalidName},
		{"empty name", func(b *store.Bundle) { b.Name = "" }, errcode.InvalidName},
		{"path name", func(b *store.Bundle) { b.Name = "a/b" }, errcode.InvalidName},
		{"bad tag", func(b *store.Bundle) { b.Tag = ".v1" }, errcode.InvalidName},
		{"tag with colon", func(b *store.Bundle) { b.Tag = "v:1" }, errcode.InvalidName},
		{"no digest", func(b *store.Bundle) { b.ImageDigest = "" }, errcode.InvalidArgument},
		{"short digest", func(b *store.Bundle) { b.ImageDigest = "sha256:abc" }, errcode.InvalidArgument},
		{"uppercase digest", func(b *store.Bundle) { b.ImageDigest = strings.ToUpper(digest("c1")) }, errcode.InvalidArgument},
		{"negative size", func(b *store.Bundle) { b.SizeBytes = -1 }, errcode.InvalidArgument},
		{"negative timeout", func(b *store.Bundle) { b.Manifest.ProcessingTimeoutSecs = -1 }, errcode.InvalidManifest},
		{"too many vcpus", func(b *store.Bundle) { b.Manifest.VCPUs = 1000 }, errcode.InvalidManifest},
		{"empty entrypoint program", func(b *store.Bundle) { b.Manifest.Entrypoint = []string{""} }, errcode.InvalidManifest},
		{"unknown owner", func(b *store.Bundle) { b.Owner = "usr_missing" }, errcode.NotFound},
	}
	for _, tc := range tests {
		b := good
		tc.edit(&b)
		_, err := s.PutBundle(ctx, b)
		wantCode(t, err, tc.code, tc.name)
	}
	if got := must(s.ListBundles(ctx, u.ID))(t); len(got) != 0 {
		t.Fatalf("refused bundles were stored: %+v", got)
	}
	must(s.PutBundle(ctx, good))(t)
}

// testOwnershipIsolation checks that names are namespaced per owner and
// that no method hands one owner another's records.
func testOwnershipIsolation(t *testing.T, s store.Store) {
	ctx := t.Context()
	a := newUser(t, s, "usera", store.RoleUser)
	b := newUser(t, s, "userb", store.RoleUser)
	ab := newBundle(t, s, a.ID, "echo", "latest", "d1")
	inv := newInvocation(t, s, a.ID, ab)
	job := must(s.CreateBundleJob(ctx, a.ID, "w1"))(t)

	for _, ref := range []string{ab.ID, "echo", "echo:latest"} {
		_, err := s.GetBundle(ctx, b.ID, ref)
		wantCode(t, err, errcode.NotFound, "B reads A's bundle by "+ref)
		_, err = s.DeleteBundle(ctx, b.ID, ref)
		wantCode(t, err, errcode.NotFound, "B deletes A's bundle by "+ref)
	}
	if got := must(s.ListBundles(ctx, b.ID))(t); len(got) != 0 {
		t.Fatalf("B lists A's bundles: %+v", got)
	}
	_, err := s.GetInvocation(ctx, b.ID, inv.ID)
	wantCode(t, err, errcode.NotFound, "B reads A's invocation")
	_, err = s.GetBundleJob(ctx, b.ID, job.ID)
	wantCode(t, err, errcode.NotFound, "B reads A's job")

	// B's own echo:latest is a separate bundle; A's is untouched.
	bb := newBundle(t, s, b.ID, "echo", "latest", "d2")
	if bb.ID == ab.ID {
		t.Fatal("B's put moved A's tag")
	}
	if got := must(s.GetBundle(ctx, a.ID, "echo"))(t); !reflect.DeepEqual(got, ab) {
		t.Fatalf("A's bundle changed: %+v, want %+v", got, ab)
	}
	if got := must(s.GetBundle(ctx, b.ID, "echo"))(t); got.ImageDigest != digest("d2") {
		t.Fatalf("B resolves echo to %+v", got)
	}
	_, err = s.GetBundle(ctx, a.ID, bb.ID)
	wantCode(t, err, errcode.NotFound, "A reads B's bundle by id")
	must(s.GetInvocation(ctx, a.ID, inv.ID))(t)
	must(s.GetBundleJob(ctx, a.ID, job.ID))(t)
}
