package gateway

import (
	"context"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/internal/testenv"
	"github.com/hyphae-run/hyphae/registry"
)

// waitJob polls an upload job until it is finished.
func (e *env) waitJob(key, id string) store.BundleJob {
	e.t.Helper()
	ctx, cancel := contextWithTestTimeout()
	defer cancel()
	for {
		var j store.BundleJob
		e.do("GET", "/bundles/jobs/"+id, key, nil).ok(e.t, http.StatusOK, &j)
		if j.Status.Final() {
			return j
		}
		select {
		case <-ctx.Done():
			e.t.Fatalf("job %s still %s (%s)", id, j.Status, j.Stage)
		case <-tick():
		}
	}
}

// The upload flow end to end: a docker save archive holding the static
// echo-go is imported with the agent by a job, becomes the caller's
// bundle, and runs.
func TestUploadBundle(t *testing.T) {
	e := newEnv(t, envOptions{freshRegistry: true})
	u, key := e.newUser("mona")
	_, keyB := e.newUser("ned")
	r := e.postMultipart("/bundles/upload", key,
		map[string]string{"name": "echo", "tag": "v1", "manifest": `{"processing_timeout_secs":20}`},
		map[string]string{"image": fx.echoArchive})
	var acc jobAccepted
	r.ok(t, http.StatusAccepted, &acc)
	if acc.Status != store.JobQueued || acc.JobURL != "/bundles/jobs/"+acc.JobID {
		t.Fatalf("accepted %+v", acc)
	}
	// Another user cannot see the job.
	e.do("GET", "/bundles/jobs/"+acc.JobID, keyB, nil).apiError(t, http.StatusNotFound, CodeNotFound)
	j := e.waitJob(key, acc.JobID)
	if j.Status != store.JobSucceeded || j.BundleID == "" || j.Stage != stageDone || j.Error != "" || j.WorkerID != e.srv.opts.WorkerID {
		t.Fatalf("job %+v (worker %q)", j, e.srv.opts.WorkerID)
	}
	var b store.Bundle
	e.do("GET", "/bundles/"+j.BundleID, key, nil).ok(t, http.StatusOK, &b)
	if b.Ref() != "echo:v1" || b.Owner != u.ID || b.Manifest.ProcessingTimeoutSecs != 20 || b.SizeBytes <= 0 {
		t.Fatalf("bundle %+v", b)
	}
	// The image is in the registry under the owner's namespace.
	if _, err := os.Stat(e.reg.ImagePath(b.ImageDigest)); err != nil {
		t.Fatalf("image file: %v", err)
	}
	var res runResult
	e.do("POST", "/run", key, map[string]any{"bundle_id": "echo:v1", "payload": map[string]int{"n": 1}}).ok(t, http.StatusOK, &res)
	if res.Stdout != `{"n":1}` || res.ExitCode != 0 {
		t.Fatalf("run of the uploaded bundle: %+v", res)
	}
	// The spooled archive is gone.
	assertEmptyDir(t, e.srv.opts.UploadDir)
}

func assertEmptyDir(t *testing.T, dir string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 0 {
		t.Fatalf("%s holds %d entries, first %s", dir, len(entries), entries[0].Name())
	}
}

func TestUploadRefusals(t *testing.T) {
	e := newEnv(t, envOptions{freshRegistry: true, maxUpload: 64 << 10})
	_, key := e.newUser("olga")
	junk := filepath.Join(t.TempDir(), "junk.tar")
	if err := os.WriteFile(junk, []byte(strings.Repeat("not a tar archive ", 100)), 0o644); err != nil {
		t.Fatal(err)
	}
	big := filepath.Join(t.TempDir(), "big.tar")
	if err := os.WriteFile(big, make([]byte, 128<<10), 0o644); err != nil {
		t.Fatal(err)
	}
	empty := filepath.Join(t.TempDir(), "empty.tar")
	if err := os.WriteFile(empty, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		fields map[string]string
		files  map[string]string
		status int
		code   string
	}{
		{"no name", nil, map[string]string{"image": junk}, 422, CodeValidation},
		{"bad name", map[string]string{"name": "Bad!"}, map[string]string{"image": junk}, 422, CodeValidation},
		{"bad tag", map[string]string{"name": "x", "tag": "-x"}, map[string]string{"image": junk}, 422, CodeValidation},
		{"bad manifest", map[string]string{"name": "x", "manifest": `{"vcpus":"many"}`}, map[string]string{"image": junk}, 422, CodeValidation},
		{"unknown manifest field", map[string]string{"name": "x", "manifest": `{"cpus":1}`}, map[string]string{"image": junk}, 422, CodeValidation},
		{"unknown field", map[string]string{"name": "x", "colour": "red"}, map[string]string{"image": junk}, 422, CodeValidation},
		{"no file", map[string]string{"name": "x"}, nil, 422, CodeValidation},
		{"empty file", map[string]string{"name": "x"}, map[string]string{"image": empty}, 422, CodeValidation},
		{"wrong file field", map[string]string{"name": "x"}, map[string]string{"file": junk}, 422, CodeValidation},
		{"over the cap", map[string]string{"name": "x"}, map[string]string{"image": big}, 413, CodePayloadTooLarge},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e.postMultipart("/bundles/upload", key, tt.fields, tt.files).apiError(t, tt.status, tt.code)
			assertEmptyDir(t, e.srv.opts.UploadDir)
		})
	}
	// A malformed archive is accepted, and its job fails with the reason.
	var acc jobAccepted
	e.postMultipart("/bundles/upload", key, map[string]string{"name": "junk"}, map[string]string{"image": junk}).
		ok(t, http.StatusAccepted, &acc)
	j := e.waitJob(key, acc.JobID)
	if j.Status != store.JobFailed || !strings.Contains(j.Error, "E405") || j.BundleID != "" {
		t.Fatalf("job %+v", j)
	}
	var list struct{ Bundles []store.Bundle }
	e.do("GET", "/bundles", key, nil).ok(t, http.StatusOK, &list)
	if len(list.Bundles) != 0 {
		t.Fatalf("a failed import left bundles %v", list.Bundles)
	}
	assertEmptyDir(t, e.srv.opts.UploadDir)
}

// Push registers a ready ext4 (here the fixture's echo image, which holds
// the agent) by its sha256, and it runs.
func TestPushBundle(t *testing.T) {
	e := newEnv(t, envOptions{freshRegistry: true})
	u, key := e.newUser("pete")
	src := filepath.Join(fx.regHome, registry.ImagesDir, strings.Replace(fx.echoDigest, ":", "-", 1)+".ext4")
	r := e.postMultipart("/bundles/push", key, map[string]string{"name": "pushed", "tag": "t1", "manifest": `{"memory_mib":256}`},
		map[string]string{"file": src})
	var b store.Bundle
	r.ok(t, http.StatusCreated, &b)
	sum := "sha256:" + testenv.FileSHA256(t, src)
	if b.ImageDigest != sum || b.Owner != u.ID || b.Ref() != "pushed:t1" || b.Manifest.MemoryMiB != 256 {
		t.Fatalf("pushed %+v (file %s)", b, sum)
	}
	img, err := e.reg.ImageByDigest(context.Background(), sum)
	if err != nil || img.Source != "push" {
		t.Fatalf("registry image %+v: %v", img, err)
	}
	if got := "sha256:" + testenv.FileSHA256(t, e.reg.ImagePath(sum)); got != sum {
		t.Fatalf("stored file hashes to %s", got)
	}
	var res runResult
	e.do("POST", "/run", key, map[string]any{"bundle_id": "pushed:t1", "payload": "x"}).ok(t, http.StatusOK, &res)
	if res.Stdout != `"x"` {
		t.Fatalf("run of the pushed bundle: %+v", res)
	}
	// Pushing the same file again (another tag) deduplicates.
	e.postMultipart("/bundles/push", key, map[string]string{"name": "pushed", "tag": "t2"}, map[string]string{"file": src}).
		ok(t, http.StatusCreated, nil)

	// Not an ext4: refused, nothing left in the images directory.
	junk := filepath.Join(t.TempDir(), "junk.ext4")
	if err := os.WriteFile(junk, make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	e.postMultipart("/bundles/push", key, map[string]string{"name": "junk"}, map[string]string{"file": junk}).
		apiError(t, http.StatusUnprocessableEntity, CodeValidation)
	entries, _ := os.ReadDir(e.reg.ImagesDir())
	for _, en := range entries {
		if strings.HasPrefix(en.Name(), registry.TempPrefix) {
			t.Fatalf("leftover %s", en.Name())
		}
	}
	if len(entries) != 1 {
		t.Fatalf("images dir holds %d files", len(entries))
	}
}

func TestListGetDeleteBundles(t *testing.T) {
	e := newEnv(t, envOptions{})
	u, key := e.newUser("quinn")
	b1 := e.seedBundle(u.ID, "zeta", fx.echoDigest, store.Manifest{})
	b2 := e.seedBundle(u.ID, "alpha", fx.bundleDigest, store.Manifest{VCPUs: 2})
	var list struct{ Bundles []store.Bundle }
	e.do("GET", "/bundles", key, nil).ok(t, http.StatusOK, &list)
	if len(list.Bundles) != 2 || list.Bundles[0].ID != b2.ID || list.Bundles[1].ID != b1.ID {
		t.Fatalf("list %+v", list.Bundles)
	}
	for _, ref := range []string{b2.ID, "alpha", "alpha:latest"} {
		var b store.Bundle
		e.do("GET", "/bundles/"+ref, key, nil).ok(t, http.StatusOK, &b)
		if b.ID != b2.ID || b.Manifest.VCPUs != 2 {
			t.Fatalf("get %s: %+v", ref, b)
		}
	}
	var del store.Bundle
	e.do("DELETE", "/bundles/alpha", key, nil).ok(t, http.StatusOK, &del)
	if del.ID != b2.ID {
		t.Fatalf("deleted %+v", del)
	}
	e.do("GET", "/bundles/alpha", key, nil).apiError(t, http.StatusNotFound, CodeNotFound)
	e.do("POST", "/run", key, map[string]string{"bundle_id": "alpha"}).apiError(t, http.StatusNotFound, CodeNotFound)
	// The image stays: another bundle may use it.
	if _, err := os.Stat(e.reg.ImagePath(fx.bundleDigest)); err != nil {
		t.Fatal(err)
	}
}

// A write that fails on the gateway's side (its disk is full) is the
// gateway's error, coded and mapped to a 5xx whose cause is not sent, not
// the client's "malformed multipart body"; the partial file is removed.
func TestSpoolDiskFull(t *testing.T) {
	testenv.RequiresRoot(t)
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", dir).CombinedOutput(); err != nil {
		testenv.Unavailable(t, "mounting a tmpfs: "+strings.TrimSpace(string(out)))
	}
	t.Cleanup(func() { _ = exec.Command("umount", dir).Run() })
	_, _, _, err := spool(context.Background(), strings.NewReader(strings.Repeat("x", 1<<20)), dir, "upload-")
	if !errcode.HasCode(err, errcode.StagingFailed) {
		t.Fatalf("spool on a full disk = %v; want %s", err, errcode.StagingFailed)
	}
	if ae := toAPIError(err); ae.Status != http.StatusInternalServerError || strings.Contains(ae.Message, dir) {
		t.Fatalf("the client sees %d %q; want a 500 without the cause", ae.Status, ae.Message)
	}
	if left, _ := os.ReadDir(dir); len(left) != 0 {
		t.Fatalf("spool left %d files behind", len(left))
	}
}

// A failed job shows its owner what was wrong with their archive, and
// nothing of the gateway's own failures.
func TestJobMessage(t *testing.T) {
	tests := []struct {
		err   error
		shown bool
	}{
		{errcode.New(errcode.MalformedArchive, "layer 2 is not a tar"), true},
		{errcode.New(errcode.InvalidName, "bad name"), true},
		{errcode.New(errcode.SizeLimit, "over 1 GiB"), true},
		{errcode.New(errcode.Draining, "shut down"), true},
		{errcode.New(errcode.StagingFailed, "writing /var/lib/dimension/x: no space left on device"), false},
		{errcode.New(errcode.MkfsFailed, "mkfs.ext4 /var/lib/dimension/y failed"), false},
		{errcode.New(errcode.StoreError, "database is locked"), false},
		{io.ErrUnexpectedEOF, false},
	}
	for _, tt := range tests {
		got := jobMessage(tt.err)
		if shown := got == tt.err.Error(); shown != tt.shown {
			t.Errorf("jobMessage(%v) = %q; shown %v, want %v", tt.err, got, shown, tt.shown)
		}
	}
}
