package gateway

import (
	"context"
	"net/http"
	"strings"
	"testing"

	"github.com/hyphae-run/hyphae/dimension/store"
)

func TestAuthRefusals(t *testing.T) {
	e := newEnv(t, envOptions{token: "s3cret-operator-token"})
	u, key := e.newUser("alice")
	var created userWithKey
	e.do("POST", "/admin/users/"+u.ID+"/keys", e.adminKey, nil).ok(t, http.StatusCreated, &created)
	e.do("POST", "/admin/users/"+u.ID+"/keys/"+created.Key.ID+"/revoke", e.adminKey, nil).ok(t, http.StatusOK, nil)

	tests := []struct {
		name   string
		header string
	}{
		{"no header", ""},
		{"not bearer", "Basic " + key},
		{"empty bearer", "Bearer "},
		{"malformed key", "Bearer dim_sk_nothex"},
		{"unknown key", "Bearer dim_sk_" + strings.Repeat("ab", 32)},
		{"revoked key", "Bearer " + created.APIKey},
		{"token prefix", "Bearer s3cret-operator"},
		{"token longer", "Bearer s3cret-operator-token!"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, path := range []string{"/bundles", "/admin/users"} {
				req, _ := http.NewRequest("GET", e.url+path, nil)
				if tt.header != "" {
					req.Header.Set("Authorization", tt.header)
				}
				r := e.send(req, "")
				r.apiError(t, http.StatusUnauthorized, CodeUnauthorized)
				if r.header.Get("WWW-Authenticate") == "" {
					t.Error("401 without WWW-Authenticate")
				}
			}
		})
	}
	// The user's first key still works; a disabled user's does not.
	e.do("GET", "/bundles", key, nil).ok(t, http.StatusOK, nil)
	if _, err := e.st.SetUserDisabled(context.Background(), u.ID, true); err != nil {
		t.Fatal(err)
	}
	e.do("GET", "/bundles", key, nil).apiError(t, http.StatusUnauthorized, CodeUnauthorized)
}

func TestTokenActsAsAdmin(t *testing.T) {
	const token = "operator-token-0123456789"
	e := newEnv(t, envOptions{token: token})
	var out userWithKey
	e.do("POST", "/admin/users", token, map[string]string{"name": "bob", "role": "admin"}).ok(t, http.StatusCreated, &out)
	if out.User.Role != store.RoleAdmin || !store.WellFormedKey(out.APIKey) {
		t.Fatalf("created %+v", out)
	}
	// The token's requests belong to its own user, which owns what it
	// makes like anyone.
	var list struct{ Users []store.User }
	e.do("GET", "/admin/users", token, nil).ok(t, http.StatusOK, &list)
	names := map[string]bool{}
	for _, u := range list.Users {
		names[u.Name] = true
	}
	if !names[TokenUserName] || !names["bob"] || !names[store.BootstrapAdminName] {
		t.Fatalf("users %v", names)
	}
	// Without the token configured it is just an unknown bearer.
	e2 := newEnv(t, envOptions{})
	e2.do("GET", "/admin/users", token, nil).apiError(t, http.StatusUnauthorized, CodeUnauthorized)
}

func TestAdminRoutes(t *testing.T) {
	e := newEnv(t, envOptions{})
	u, key := e.newUser("carol")
	if u.Role != store.RoleUser || !store.WellFormedKey(key) {
		t.Fatalf("new user %+v key %q", u, key)
	}
	// A non-admin is forbidden on every admin route.
	for _, rt := range []struct{ method, path string }{
		{"GET", "/admin/users"}, {"POST", "/admin/users"}, {"DELETE", "/admin/users/" + u.ID},
		{"GET", "/admin/users/" + u.ID + "/keys"}, {"POST", "/admin/users/" + u.ID + "/keys"},
		{"POST", "/admin/users/" + u.ID + "/promote"}, {"POST", "/admin/users/" + u.ID + "/demote"},
		{"POST", "/admin/users/" + u.ID + "/keys/key_x/revoke"},
	} {
		e.do(rt.method, rt.path, key, nil).apiError(t, http.StatusForbidden, CodeForbidden)
	}

	// Keys: create, list (prefix only), revoke.
	var k userWithKey
	e.do("POST", "/admin/users/"+u.ID+"/keys", e.adminKey, nil).ok(t, http.StatusCreated, &k)
	e.do("GET", "/bundles", k.APIKey, nil).ok(t, http.StatusOK, nil)
	var keys struct{ Keys []store.APIKey }
	e.do("GET", "/admin/users/"+u.ID+"/keys", e.adminKey, nil).ok(t, http.StatusOK, &keys)
	if len(keys.Keys) != 2 || keys.Keys[1].Prefix != k.APIKey[:store.KeyPrefixLen] {
		t.Fatalf("keys %+v", keys.Keys)
	}
	r := e.do("GET", "/admin/users/"+u.ID+"/keys", e.adminKey, nil)
	if strings.Contains(string(r.body), k.APIKey) || strings.Contains(string(r.body), key) {
		t.Fatal("a key listing shows a whole key")
	}
	var revoked store.APIKey
	e.do("POST", "/admin/users/"+u.ID+"/keys/"+k.Key.ID+"/revoke", e.adminKey, nil).ok(t, http.StatusOK, &revoked)
	if revoked.RevokedAt == nil {
		t.Fatalf("revoked %+v", revoked)
	}
	e.do("GET", "/bundles", k.APIKey, nil).apiError(t, http.StatusUnauthorized, CodeUnauthorized)
	e.do("POST", "/admin/users/"+u.ID+"/keys/key_nope/revoke", e.adminKey, nil).apiError(t, http.StatusNotFound, CodeNotFound)

	// Promote, then the user can administer.
	var pu store.User
	e.do("POST", "/admin/users/"+u.ID+"/promote", e.adminKey, nil).ok(t, http.StatusOK, &pu)
	if pu.Role != store.RoleAdmin {
		t.Fatalf("promoted %+v", pu)
	}
	e.do("GET", "/admin/users", key, nil).ok(t, http.StatusOK, nil)
	e.do("POST", "/admin/users/"+u.ID+"/demote", e.adminKey, nil).ok(t, http.StatusOK, &pu)
	e.do("GET", "/admin/users", key, nil).apiError(t, http.StatusForbidden, CodeForbidden)

	// Bad input.
	e.do("POST", "/admin/users", e.adminKey, map[string]string{"name": "carol"}).apiError(t, http.StatusConflict, CodeConflict)
	e.do("POST", "/admin/users", e.adminKey, map[string]string{"name": "Bad Name"}).apiError(t, http.StatusUnprocessableEntity, CodeValidation)
	e.do("POST", "/admin/users", e.adminKey, map[string]string{"name": "dave", "role": "root"}).apiError(t, http.StatusUnprocessableEntity, CodeValidation)
	e.do("POST", "/admin/users", e.adminKey, map[string]any{"name": "dave", "extra": 1}).apiError(t, http.StatusUnprocessableEntity, CodeValidation)
	e.do("POST", "/admin/users/usr_missing/promote", e.adminKey, nil).apiError(t, http.StatusNotFound, CodeNotFound)
	e.do("POST", "/admin/users/usr_missing/keys", e.adminKey, nil).apiError(t, http.StatusNotFound, CodeNotFound)
	e.do("GET", "/admin/users/..%2Fx/keys", e.adminKey, nil).apiError(t, http.StatusUnprocessableEntity, CodeValidation)

	// Delete: the user's key dies with it.
	r = e.do("DELETE", "/admin/users/"+u.ID, e.adminKey, nil)
	if r.status != http.StatusNoContent {
		t.Fatalf("delete: %d %s", r.status, r.body)
	}
	e.do("GET", "/bundles", key, nil).apiError(t, http.StatusUnauthorized, CodeUnauthorized)
	e.do("DELETE", "/admin/users/"+u.ID, e.adminKey, nil).apiError(t, http.StatusNotFound, CodeNotFound)
}

func TestLastAdminGuard(t *testing.T) {
	e := newEnv(t, envOptions{})
	admin, err := e.st.GetUserByName(context.Background(), store.BootstrapAdminName)
	if err != nil {
		t.Fatal(err)
	}
	e.do("POST", "/admin/users/"+admin.ID+"/demote", e.adminKey, nil).apiError(t, http.StatusConflict, CodeConflict)
	e.do("DELETE", "/admin/users/"+admin.ID, e.adminKey, nil).apiError(t, http.StatusConflict, CodeConflict)
	// With a second admin the first may go.
	u, key := e.newUser("erin")
	e.do("POST", "/admin/users/"+u.ID+"/promote", e.adminKey, nil).ok(t, http.StatusOK, nil)
	r := e.do("DELETE", "/admin/users/"+admin.ID, key, nil)
	if r.status != http.StatusNoContent {
		t.Fatalf("delete: %d %s", r.status, r.body)
	}
	e.do("POST", "/admin/users/"+u.ID+"/demote", key, nil).apiError(t, http.StatusConflict, CodeConflict)
}
