package gateway

import (
	"bytes"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"
)

// Whatever the body, decoding a run request either succeeds or fails
// with a 400 or 422 envelope error: never a panic, never a 5xx.
func FuzzDecodeRunRequest(f *testing.F) {
	for _, s := range []string{
		`{"bundle_id":"echo","mode":"async","payload":{"a":[1,2]},"timeout_secs":3}`,
		`{"bundle_id":7}`, `{"bundle_id":"x"} {}`, `[`, `null`, `"x"`, `{"payload":` + "\xff" + `}`,
		`{"timeout_secs":1e99}`, `{"bundle_id":"x","bundle_id":"y"}`, ``,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		var req runRequest
		err := decodeJSON(body, &req)
		if err == nil {
			return
		}
		var ae *APIError
		if !errors.As(err, &ae) || (ae.Status != http.StatusBadRequest && ae.Status != http.StatusUnprocessableEntity) {
			t.Fatalf("decode error %v is not a 400/422 APIError", err)
		}
	})
}

// Whatever the multipart body, readUpload ends in a 4xx or an upload, and
// leaves no file behind on failure.
func FuzzReadUpload(f *testing.F) {
	f.Add([]byte("--B\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\necho\r\n--B\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.tar\"\r\n\r\nDATA\r\n--B--\r\n"))
	f.Add([]byte("--B\r\nContent-Disposition: form-data; name=\"manifest\"\r\n\r\n{\"vcpus\":1}\r\n--B--\r\n"))
	f.Add([]byte("--B\r\n\r\n--B--"))
	f.Add([]byte("garbage"))
	f.Fuzz(func(t *testing.T, body []byte) {
		dir := t.TempDir()
		s := &Server{opts: Options{MaxUploadBytes: 1 << 20}}
		r := httptest.NewRequest("POST", "/bundles/upload", bytes.NewReader(body))
		r.Header.Set("Content-Type", "multipart/form-data; boundary=B")
		u, err := s.readUpload(r, "image", dir, "upload-")
		if err != nil {
			if toAPIError(err).Status >= 500 {
				t.Fatalf("5xx for a bad body: %v", err)
			}
			assertEmptyDir(t, dir)
			return
		}
		if u.path == "" || u.name == "" || u.tag == "" {
			t.Fatalf("accepted an incomplete upload %+v", u)
		}
	})
}
