package store

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"regexp"
)

// API keys are KeyPrefix followed by 64 lowercase hex digits (32 random
// bytes), as ARCHITECTURE.md §3.4 fixes.
const (
	KeyPrefix = "dim_sk_"
	// KeyPrefixLen is how much of a key listings show: "dim_sk_" and 8 hex
	// digits, enough to tell keys apart and far too little to guess one.
	KeyPrefixLen = 15
)

var keyRE = regexp.MustCompile(`^dim_sk_[0-9a-f]{64}$`)

// NewAPIKey returns a fresh random key.
func NewAPIKey() string {
	var b [32]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails on Linux
	return KeyPrefix + hex.EncodeToString(b[:])
}

// WellFormedKey reports whether s has the shape of an API key, so that
// garbage is refused without a database lookup.
func WellFormedKey(s string) bool { return keyRE.MatchString(s) }

// HashKey returns the hex SHA-256 of a key, the only form stored. A plain
// hash suffices: keys carry 256 random bits, so there is nothing to
// brute-force that a slow hash would protect.
func HashKey(plaintext string) string {
	sum := sha256.Sum256([]byte(plaintext))
	return hex.EncodeToString(sum[:])
}

// DisplayPrefix returns the part of a key shown in listings.
func DisplayPrefix(plaintext string) string {
	if len(plaintext) < KeyPrefixLen {
		return plaintext
	}
	return plaintext[:KeyPrefixLen]
}
