package gateway

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"os"
	"strings"

	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/image"
	"github.com/hyphae-run/hyphae/registry"
)

// maxFieldBytes bounds a multipart text field (name, tag, manifest).
const maxFieldBytes = 64 << 10

func (s *Server) listBundles(w http.ResponseWriter, r *http.Request) error {
	bs, err := s.store.ListBundles(r.Context(), callerOf(r).User.ID)
	if err != nil {
		return err
	}
	if bs == nil {
		bs = []store.Bundle{}
	}
	writeJSON(w, http.StatusOK, map[string]any{"bundles": bs})
	return nil
}

// getBundle answers for the caller's bundle named by id: a bundle id or
// name[:tag].
func (s *Server) getBundle(w http.ResponseWriter, r *http.Request) error {
	b, err := s.store.GetBundle(r.Context(), callerOf(r).User.ID, r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, b)
	return nil
}

// deleteBundle removes the caller's bundle row. The image file stays in
// the registry: other bundles (of any owner) may share its digest, and
// runs in progress may be reading it.
func (s *Server) deleteBundle(w http.ResponseWriter, r *http.Request) error {
	b, err := s.store.DeleteBundle(r.Context(), callerOf(r).User.ID, r.PathValue("id"))
	if err != nil {
		return err
	}
	s.log.Info("bundle deleted", "bundle", b.ID, "ref", b.Ref(), "owner", b.Owner)
	writeJSON(w, http.StatusOK, b)
	return nil
}

func (s *Server) getJob(w http.ResponseWriter, r *http.Request) error {
	id, err := pathID(r, "id")
	if err != nil {
		return err
	}
	j, err := s.store.GetBundleJob(r.Context(), callerOf(r).User.ID, id)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, j)
	return nil
}

// upload is a multipart bundle request: its file spooled to disk, its
// text fields in memory.
type upload struct {
	path   string // spooled file; the caller removes it
	size   int64
	digest string // "sha256:<hex>" of the file
	name   string
	tag    string
	// manifest is the parsed manifest field (zero when absent).
	manifest store.Manifest
}

// readUpload reads a multipart/form-data body whose file part is named
// fileField, spooling it into dir as a temp file named prefix*, and whose
// other parts are name (required), tag (default latest) and manifest
// (optional JSON). Nothing is left on disk when it fails.
func (s *Server) readUpload(r *http.Request, fileField, dir, prefix string) (_ upload, err error) {
	mt, params, perr := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if perr != nil || mt != "multipart/form-data" || params["boundary"] == "" {
		return upload{}, apiErr(http.StatusBadRequest, CodeBadRequest, "the body must be multipart/form-data")
	}
	mr := multipart.NewReader(r.Body, params["boundary"])
	var u upload
	defer func() {
		if err != nil && u.path != "" {
			os.Remove(u.path)
		}
	}()
	seen := map[string]bool{}
	var manifest string
	for {
		part, err := mr.NextPart()
		if err == io.EOF {
			break
		}
		if err != nil {
			return u, multipartErr(err)
		}
		field := part.FormName()
		if seen[field] {
			return u, validation(field, "field %q is given twice", field)
		}
		seen[field] = true
		switch field {
		case fileField:
			if u.path, u.size, u.digest, err = spool(r.Context(), part, dir, prefix); err != nil {
				return u, err
			}
		case "name", "tag", "manifest":
			v, err := io.ReadAll(io.LimitReader(part, maxFieldBytes+1))
			if err != nil {
				return u, multipartErr(err)
			}
			if len(v) > maxFieldBytes {
				return u, validation(field, "field %q is over %d bytes", field, maxFieldBytes)
			}
			switch field {
			case "name":
				u.name = strings.TrimSpace(string(v))
			case "tag":
				u.tag = strings.TrimSpace(string(v))
			default:
				manifest = string(v)
			}
		default:
			return u, validation(field, "unknown field %q (expected %s, name, tag, manifest)", field, fileField)
		}
	}
	if u.path == "" {
		return u, validation(fileField, "the %q file part is missing", fileField)
	}
	if u.size == 0 {
		return u, validation(fileField, "the %q file is empty", fileField)
	}
	if u.name == "" {
		return u, validation("name", "the bundle name is missing")
	}
	if u.tag == "" {
		u.tag = registry.DefaultTag
	}
	if err := registry.ValidateName(u.name); err != nil {
		return u, err
	}
	if err := registry.ValidateTag(u.tag); err != nil {
		return u, err
	}
	if strings.TrimSpace(manifest) != "" {
		if u.manifest, err = store.ParseManifest([]byte(manifest)); err != nil {
			return u, err
		}
	}
	return u, nil
}

// multipartErr maps a multipart read failure: over the cap is 413,
// anything else a malformed body.
func multipartErr(err error) error {
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		return toAPIError(err)
	}
	return apiErr(http.StatusBadRequest, CodeBadRequest, "malformed multipart body: "+err.Error())
}

// spool copies src into a new temp file in dir, hashing it on the way, so
// an upload is never held in memory. The request's MaxBytesReader bounds
// it. A failed read is the client's (multipartErr); a failed write (a full
// disk) is the gateway's, coded errcode.StagingFailed, so its cause is
// logged rather than sent. On failure the file is removed.
func spool(ctx context.Context, src io.Reader, dir, prefix string) (path string, size int64, digest string, err error) {
	f, err := os.CreateTemp(dir, prefix+"*")
	if err != nil {
		return "", 0, "", errcode.Wrap(errcode.StagingFailed, err, "creating an upload file in %s", dir)
	}
	h := sha256.New()
	fw := &fileWriter{f: f}
	size, err = io.Copy(io.MultiWriter(fw, h), &ctxReader{ctx: ctx, r: src})
	cerr := f.Close()
	switch {
	case fw.err != nil || (err == nil && cerr != nil):
		err = errcode.Wrap(errcode.StagingFailed, errors.Join(fw.err, cerr), "writing the upload file %s", f.Name())
	case err != nil:
		err = multipartErr(err)
	}
	if err != nil {
		os.Remove(f.Name())
		return "", 0, "", err
	}
	return f.Name(), size, "sha256:" + hex.EncodeToString(h.Sum(nil)), nil
}

// fileWriter remembers its file's write error, which io.Copy does not
// tell apart from a read error.
type fileWriter struct {
	f   *os.File
	err error
}

func (w *fileWriter) Write(p []byte) (int, error) {
	n, err := w.f.Write(p)
	if err != nil && w.err == nil {
		w.err = err
	}
	return n, err
}

// ctxReader fails reads once ctx is done, so a cancelled request stops
// its spool.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c *ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

// jobAccepted is POST /bundles/upload's 202 body.
type jobAccepted struct {
	JobID  string          `json:"job_id"`
	Status store.JobStatus `json:"status"`
	JobURL string          `json:"job_url"`
}

// uploadBundle accepts a `docker save` archive (multipart field image) and
// starts a job importing it with the agent; GET /bundles/jobs/{id} follows
// it.
func (s *Server) uploadBundle(w http.ResponseWriter, r *http.Request) error {
	if err := s.refuseWhileDraining(); err != nil {
		return err
	}
	owner := callerOf(r).User.ID
	u, err := s.readUpload(r, "image", s.opts.UploadDir, "upload-")
	if err != nil {
		return err
	}
	job, err := s.store.CreateBundleJob(r.Context(), owner, s.opts.WorkerID)
	if err != nil {
		os.Remove(u.path)
		return err
	}
	s.log.Info("bundle upload accepted", "job", job.ID, "owner", owner, "ref", u.name+":"+u.tag, "bytes", u.size)
	s.background.Add(1)
	go s.importJob(job.ID, owner, u)
	writeJSON(w, http.StatusAccepted, jobAccepted{JobID: job.ID, Status: job.Status, JobURL: "/bundles/jobs/" + job.ID})
	return nil
}

// Import job stages, shown in GET /bundles/jobs/{id}.
const (
	stageWaiting     = "waiting for an import slot"
	stageImporting   = "importing (unpacking layers, mkfs.ext4)"
	stageRegistering = "registering the bundle"
	stageDone        = "done"
)

// importJob runs one upload's import: wait for a slot, hyphae import with
// the agent into the registry (namespaced by owner), then the bundle row.
// The spooled archive is removed however it ends.
func (s *Server) importJob(jobID, owner string, u upload) {
	defer s.background.Done()
	defer os.Remove(u.path)
	ctx := s.jobCtx
	log := s.log.With("job", jobID, "owner", owner, "ref", u.name+":"+u.tag)
	// Job updates use a context that outlives a cancelled import, so the
	// job still ends as failed.
	update := func(st store.JobStatus, stage, msg, bundleID string) {
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), storeTimeout)
		defer cancel()
		if _, err := s.store.UpdateBundleJob(uctx, jobID, store.BundleJobUpdate{Status: st, Stage: stage, Error: msg, BundleID: bundleID}); err != nil {
			log.Error("updating the bundle job", "status", st, "err", err)
		}
	}
	fail := func(err error) {
		log.Warn("bundle import failed", "err", err)
		// Counted before the job shows final, so that whoever sees it
		// final also sees it counted.
		s.metrics.uploadJobEnded(store.JobFailed)
		update(store.JobFailed, "failed", jobMessage(err), "")
	}

	update(store.JobQueued, stageWaiting, "", "")
	select {
	case s.jobs <- struct{}{}:
		defer func() { <-s.jobs }()
	case <-ctx.Done():
		fail(errcode.New(errcode.Draining, "the gateway shut down before the import started"))
		return
	}
	update(store.JobRunning, stageImporting, "", "")
	b := image.Builder{Store: ownerImages{Images: s.opts.Images, owner: owner}, Logger: log}
	res, err := b.Import(ctx, image.ImportOptions{Archive: u.path, Name: u.name, Tag: u.tag, WithAgent: true})
	if err != nil {
		fail(err)
		return
	}
	update(store.JobRunning, stageRegistering, "", "")
	bundle, err := s.store.PutBundle(ctx, store.Bundle{
		Owner: owner, Name: u.name, Tag: u.tag, ImageDigest: res.Digest, Manifest: u.manifest, SizeBytes: res.SizeBytes,
	})
	if err != nil {
		fail(err)
		return
	}
	log.Info("bundle imported", "bundle", bundle.ID, "digest", res.Digest, "cached", res.Cached)
	s.metrics.uploadJobEnded(store.JobSucceeded)
	update(store.JobSucceeded, stageDone, "", bundle.ID)
}

// jobMessage is what a failed job shows its owner: the text of errors
// about their archive (bad input, bad image, too big), and only "internal
// error" for the gateway's own failures, which are logged: among the
// root-filesystem codes, mkfs.ext4 and writing the staged tree fail on the
// gateway's disk, and their text names its paths.
func jobMessage(err error) string {
	switch c := errcode.CodeOf(err); {
	case c == errcode.MkfsFailed, c == errcode.StagingFailed:
		return "internal error (see the gateway's log)"
	case strings.HasPrefix(string(c), "E2"), strings.HasPrefix(string(c), "E4"), c == errcode.Draining:
		return err.Error()
	default:
		return "internal error (see the gateway's log)"
	}
}

// ownerImages is the registry with every tag an import writes put under
// the bundle's owner, so two users' "echo:latest" never move each
// other's registry tags.
type ownerImages struct {
	Images
	owner string
}

func (o ownerImages) PutImage(ctx context.Context, img registry.Image) error {
	img.Owner = o.owner
	return o.Images.PutImage(ctx, img)
}

// ext4 superblock magic: 0xEF53, little-endian at byte 1024+56.
const (
	ext4MagicOffset = 1024 + 56
	ext4Magic       = 0xEF53
)

// checkExt4 refuses a file that is not an ext2/3/4 filesystem.
func checkExt4(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return errcode.Wrap(errcode.StagingFailed, err, "reading the pushed file")
	}
	defer f.Close()
	var b [2]byte
	if _, err := f.ReadAt(b[:], ext4MagicOffset); err != nil || uint16(b[0])|uint16(b[1])<<8 != ext4Magic {
		return validation("file", "the pushed file is not an ext4 filesystem (no superblock magic at byte %d)", ext4MagicOffset)
	}
	return nil
}

// pushBundle registers a ready ext4 image (multipart field file) under
// its sha256 and points the caller's name:tag at it.
func (s *Server) pushBundle(w http.ResponseWriter, r *http.Request) error {
	if err := s.refuseWhileDraining(); err != nil {
		return err
	}
	owner := callerOf(r).User.ID
	// Spooled inside the images directory, so registering is a rename.
	u, err := s.readUpload(r, "file", s.opts.Images.ImagesDir(), registry.TempPrefix+"push-")
	if err != nil {
		return err
	}
	// Gone after a successful PutImage (moved or deduplicated).
	defer os.Remove(u.path)
	if err := checkExt4(u.path); err != nil {
		return err
	}
	img := registry.Image{Digest: u.digest, Name: u.name, Tag: u.tag, Owner: owner, SizeBytes: u.size, Source: "push", Path: u.path}
	if err := s.opts.Images.PutImage(r.Context(), img); err != nil {
		return err
	}
	b, err := s.store.PutBundle(r.Context(), store.Bundle{
		Owner: owner, Name: u.name, Tag: u.tag, ImageDigest: u.digest, Manifest: u.manifest, SizeBytes: u.size,
	})
	if err != nil {
		return err
	}
	s.log.Info("bundle pushed", "bundle", b.ID, "ref", b.Ref(), "owner", owner, "digest", u.digest, "bytes", u.size)
	writeJSON(w, http.StatusCreated, b)
	return nil
}
