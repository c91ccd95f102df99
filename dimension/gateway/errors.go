package gateway

import (
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"strconv"
	"strings"

	"github.com/hyphae-run/hyphae/errcode"
)

// Error codes of the HTTP error envelope (ARCHITECTURE §3.4). Each goes with
// one status, except that an unsupported method answers 405 with
// CodeBadRequest (the contract has no code of its own for it).
const (
	CodeValidation         = "validation_error"    // 422
	CodeUnauthorized       = "unauthorized"        // 401
	CodeBadRequest         = "bad_request"         // 400
	CodeForbidden          = "forbidden"           // 403
	CodeNotFound           = "not_found"           // 404
	CodeConflict           = "conflict"            // 409
	CodePayloadTooLarge    = "payload_too_large"   // 413
	CodeQuotaExceeded      = "quota_exceeded"      // 429
	CodeCapacityExceeded   = "capacity_exceeded"   // 503 with Retry-After
	CodeServiceUnavailable = "service_unavailable" // 503
	CodeGatewayTimeout     = "gateway_timeout"     // 504
	CodeInternal           = "internal_error"      // 500
)

// retryAfterSecs is the Retry-After a client at capacity is given: runs
// take seconds, so a second is a fair first backoff.
const retryAfterSecs = 1

// APIError is an error as the HTTP API shows it. Handlers return it (or any
// error, which writeError maps) and writeError renders the envelope
// {"error":{"code","message","details"}}.
type APIError struct {
	Status  int
	Code    string
	Message string
	Details any
	// Cause is logged, never sent.
	Cause error
}

func (e *APIError) Error() string {
	if e.Cause != nil {
		return e.Code + ": " + e.Message + ": " + e.Cause.Error()
	}
	return e.Code + ": " + e.Message
}

func (e *APIError) Unwrap() error { return e.Cause }

// apiErr builds an APIError.
func apiErr(status int, code, message string) *APIError {
	return &APIError{Status: status, Code: code, Message: message}
}

// withDetails sets the details and returns e.
func (e *APIError) withDetails(d any) *APIError {
	e.Details = d
	return e
}

// internal is a 500 whose cause is logged and whose message says nothing.
func internal(cause error) *APIError {
	return &APIError{Status: http.StatusInternalServerError, Code: CodeInternal, Message: "internal error", Cause: cause}
}

// codedDetails are the details of an error mapped from a coded library
// error: the stable hyphae code and its hint, for scripts and people.
type codedDetails struct {
	ErrCode string `json:"errcode"`
	Hint    string `json:"hint,omitempty"`
}

// toAPIError maps any error to what the client sees. Coded errors from the
// store, the event log and the runner map by code; everything else is an
// internal error.
func toAPIError(err error) *APIError {
	var ae *APIError
	if errors.As(err, &ae) {
		return ae
	}
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		return apiErr(http.StatusRequestEntityTooLarge, CodePayloadTooLarge,
			"request body is over "+strconv.FormatInt(mbe.Limit, 10)+" bytes")
	}
	code := errcode.CodeOf(err)
	status, apiCode := 0, ""
	switch code {
	case errcode.InvalidArgument, errcode.InvalidName, errcode.InvalidManifest, errcode.InvalidEnv:
		status, apiCode = http.StatusUnprocessableEntity, CodeValidation
	case errcode.NotFound:
		status, apiCode = http.StatusNotFound, CodeNotFound
	case errcode.Conflict, errcode.AlreadyExists, errcode.LastAdmin, errcode.RunFinished:
		status, apiCode = http.StatusConflict, CodeConflict
	case errcode.Unauthenticated:
		status, apiCode = http.StatusUnauthorized, CodeUnauthorized
	case errcode.SizeLimit:
		status, apiCode = http.StatusRequestEntityTooLarge, CodePayloadTooLarge
	case errcode.StoreError, errcode.EventLogFailed:
		// The cause (a database or NATS error) is not the client's
		// business; that the service is unwell is.
		return &APIError{Status: http.StatusServiceUnavailable, Code: CodeServiceUnavailable,
			Message: "a backing service is unavailable; retry later", Cause: err}
	case errcode.CapacityExceeded:
		return &APIError{Status: http.StatusServiceUnavailable, Code: CodeCapacityExceeded,
			Message: "every run permit is in use; retry later", Cause: err}
	case errcode.Draining:
		return &APIError{Status: http.StatusServiceUnavailable, Code: CodeServiceUnavailable,
			Message: "the gateway is shutting down and takes no new runs", Cause: err}
	default:
		return internal(err)
	}
	return &APIError{Status: status, Code: apiCode, Message: clientMessage(err),
		Details: codedDetails{ErrCode: string(code), Hint: errcode.HintOf(err)}}
}

// clientMessage is a coded error's text without its leading "Exxx: " (the
// code travels in the details).
func clientMessage(err error) string {
	msg := err.Error()
	if c := errcode.CodeOf(err); c != "" {
		msg = strings.TrimPrefix(msg, string(c)+": ")
	}
	return msg
}

// envelope is the body of every error response.
type envelope struct {
	Error envelopeBody `json:"error"`
}

type envelopeBody struct {
	Code    string `json:"code"`
	Message string `json:"message"`
	Details any    `json:"details"`
}

// writeError writes err as the error envelope. 5xx causes are logged with
// the request; they never reach the client.
func writeError(w http.ResponseWriter, r *http.Request, log *slog.Logger, err error) {
	ae := toAPIError(err)
	if ae.Status >= 500 {
		log.Error("request failed", "method", r.Method, "path", r.URL.Path, "status", ae.Status, "code", ae.Code, "err", err)
	} else {
		log.Debug("request refused", "method", r.Method, "path", r.URL.Path, "status", ae.Status, "code", ae.Code, "err", err)
	}
	if ae.Code == CodeCapacityExceeded {
		w.Header().Set("Retry-After", strconv.Itoa(retryAfterSecs))
	}
	if ae.Status == http.StatusUnauthorized {
		w.Header().Set("WWW-Authenticate", `Bearer realm="dimension"`)
	}
	writeJSON(w, ae.Status, envelope{Error: envelopeBody{Code: ae.Code, Message: ae.Message, Details: ae.Details}})
}

// writeJSON writes v as a JSON response with status.
func writeJSON(w http.ResponseWriter, status int, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		// Only our own types are written; they always marshal.
		body = []byte(`{"error":{"code":"internal_error","message":"internal error","details":null}}`)
		status = http.StatusInternalServerError
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_, _ = w.Write(append(body, '\n'))
}
