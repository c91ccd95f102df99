package gateway

import (
	"net/http"

	"github.com/hyphae-run/hyphae/dimension/store"
)

// createUserRequest is POST /admin/users' body.
type createUserRequest struct {
	Name string     `json:"name"`
	Role store.Role `json:"role"`
}

// userWithKey is a new user or key with its plaintext, shown only here.
type userWithKey struct {
	User   *store.User  `json:"user,omitempty"`
	Key    store.APIKey `json:"key"`
	APIKey string       `json:"api_key"`
}

// createUser adds a user (role "user" unless given) with a first API key.
func (s *Server) createUser(w http.ResponseWriter, r *http.Request) error {
	var req createUserRequest
	if err := decodeBody(w, r, s.opts.MaxBodyBytes, &req, false); err != nil {
		return err
	}
	if req.Role == "" {
		req.Role = store.RoleUser
	}
	if !req.Role.Valid() {
		return validation("role", "role %q is neither admin nor user", req.Role)
	}
	if err := store.ValidateUserName(req.Name); err != nil {
		return err
	}
	u, err := s.store.CreateUser(r.Context(), req.Name, req.Role)
	if err != nil {
		return err
	}
	k, plain, err := s.store.CreateAPIKey(r.Context(), u.ID)
	if err != nil {
		// Do not leave a user nobody can log in as.
		if derr := s.store.DeleteUser(r.Context(), u.ID); derr != nil {
			s.log.Error("removing a user whose key could not be made", "user", u.ID, "err", derr)
		}
		return err
	}
	s.log.Info("user created", "user", u.ID, "name", u.Name, "role", u.Role, "by", callerOf(r).User.ID)
	writeJSON(w, http.StatusCreated, userWithKey{User: &u, Key: k, APIKey: plain})
	return nil
}

func (s *Server) listUsers(w http.ResponseWriter, r *http.Request) error {
	us, err := s.store.ListUsers(r.Context())
	if err != nil {
		return err
	}
	if us == nil {
		us = []store.User{}
	}
	writeJSON(w, http.StatusOK, map[string]any{"users": us})
	return nil
}

// deleteUser removes a user with everything they own; the store refuses
// to delete the last enabled admin (409).
func (s *Server) deleteUser(w http.ResponseWriter, r *http.Request) error {
	id, err := pathID(r, "id")
	if err != nil {
		return err
	}
	if err := s.store.DeleteUser(r.Context(), id); err != nil {
		return err
	}
	s.log.Info("user deleted", "user", id, "by", callerOf(r).User.ID)
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (s *Server) createKey(w http.ResponseWriter, r *http.Request) error {
	id, err := pathID(r, "id")
	if err != nil {
		return err
	}
	if _, err := s.store.GetUser(r.Context(), id); err != nil {
		return err
	}
	k, plain, err := s.store.CreateAPIKey(r.Context(), id)
	if err != nil {
		return err
	}
	s.log.Info("api key created", "user", id, "key", k.ID, "by", callerOf(r).User.ID)
	writeJSON(w, http.StatusCreated, userWithKey{Key: k, APIKey: plain})
	return nil
}

func (s *Server) listKeys(w http.ResponseWriter, r *http.Request) error {
	id, err := pathID(r, "id")
	if err != nil {
		return err
	}
	if _, err := s.store.GetUser(r.Context(), id); err != nil {
		return err
	}
	ks, err := s.store.ListAPIKeys(r.Context(), id)
	if err != nil {
		return err
	}
	if ks == nil {
		ks = []store.APIKey{}
	}
	writeJSON(w, http.StatusOK, map[string]any{"keys": ks})
	return nil
}

func (s *Server) revokeKey(w http.ResponseWriter, r *http.Request) error {
	id, err := pathID(r, "id")
	if err != nil {
		return err
	}
	kid, err := pathID(r, "kid")
	if err != nil {
		return err
	}
	k, err := s.store.RevokeAPIKey(r.Context(), id, kid)
	if err != nil {
		return err
	}
	s.log.Info("api key revoked", "user", id, "key", kid, "by", callerOf(r).User.ID)
	writeJSON(w, http.StatusOK, k)
	return nil
}

// setRole returns the promote or demote handler; demoting the last
// enabled admin is the store's 409.
func (s *Server) setRole(role store.Role) handlerFunc {
	return func(w http.ResponseWriter, r *http.Request) error {
		id, err := pathID(r, "id")
		if err != nil {
			return err
		}
		u, err := s.store.SetUserRole(r.Context(), id, role)
		if err != nil {
			return err
		}
		s.log.Info("user role set", "user", id, "role", role, "by", callerOf(r).User.ID)
		writeJSON(w, http.StatusOK, u)
		return nil
	}
}
