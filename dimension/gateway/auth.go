package gateway

import (
	"context"
	"crypto/subtle"
	"net/http"
	"strings"

	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/errcode"
)

// TokenUserName is the user that requests made with DIMENSION_TOKEN act as:
// bundles and runs need an owner row, and a named user keeps them
// attributable (and deletable) like anyone's.
const TokenUserName = "dimension-token"

// caller is who a request is from.
type caller struct {
	User store.User
	// Admin is set for admins and for the DIMENSION_TOKEN holder, whose
	// user row may have been demoted: the token itself is the authority.
	Admin bool
}

type callerKey struct{}

// callerOf returns the authenticated caller of r (set by authenticated).
func callerOf(r *http.Request) caller {
	c, _ := r.Context().Value(callerKey{}).(caller)
	return c
}

// bearer extracts the token of an "Authorization: Bearer <token>" header.
func bearer(r *http.Request) (string, bool) {
	h := r.Header.Get("Authorization")
	scheme, tok, ok := strings.Cut(h, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	tok = strings.TrimSpace(tok)
	return tok, tok != ""
}

// handlerFunc is a handler that returns its error for writeError.
type handlerFunc func(w http.ResponseWriter, r *http.Request) error

// authenticated wraps h so that it runs only for a valid bearer token, with
// the caller in the request's context; adminOnly further requires an admin.
func (s *Server) authenticated(adminOnly bool, h handlerFunc) http.Handler {
	return s.handle(func(w http.ResponseWriter, r *http.Request) error {
		tok, ok := bearer(r)
		if !ok {
			return apiErr(http.StatusUnauthorized, CodeUnauthorized, "missing bearer token (Authorization: Bearer <api key>)")
		}
		c, err := s.authenticate(r.Context(), tok)
		if err != nil {
			return err
		}
		if adminOnly && !c.Admin {
			return apiErr(http.StatusForbidden, CodeForbidden, "this route needs an admin")
		}
		return h(w, r.WithContext(context.WithValue(r.Context(), callerKey{}, c)))
	})
}

// authenticate resolves a bearer token to its caller: the configured
// DIMENSION_TOKEN (compared in constant time), else an API key.
func (s *Server) authenticate(ctx context.Context, tok string) (caller, error) {
	if s.opts.Token != "" && subtle.ConstantTimeCompare([]byte(tok), []byte(s.opts.Token)) == 1 {
		u, err := s.tokenUser(ctx)
		if err != nil {
			return caller{}, err
		}
		return caller{User: u, Admin: true}, nil
	}
	p, err := s.store.Authenticate(ctx, tok)
	if err != nil {
		if errcode.HasCode(err, errcode.Unauthenticated) {
			// One message for every refusal: which part was wrong is
			// not the caller's to learn.
			return caller{}, apiErr(http.StatusUnauthorized, CodeUnauthorized, "invalid, revoked or disabled API key")
		}
		return caller{}, err
	}
	return caller{User: p.User, Admin: p.User.Role == store.RoleAdmin}, nil
}

// tokenUser returns the TokenUserName user, creating it (as an admin) when
// it does not exist yet or was deleted.
func (s *Server) tokenUser(ctx context.Context) (store.User, error) {
	u, err := s.store.GetUserByName(ctx, TokenUserName)
	if errcode.HasCode(err, errcode.NotFound) {
		u, err = s.store.CreateUser(ctx, TokenUserName, store.RoleAdmin)
		if errcode.HasCode(err, errcode.AlreadyExists) {
			// Another request (or gateway) created it first.
			u, err = s.store.GetUserByName(ctx, TokenUserName)
		}
	}
	return u, err
}
