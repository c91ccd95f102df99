package registry

import (
	"regexp"
	"strings"

	"github.com/hyphae-run/hyphae/errcode"
)

// DefaultTag is the tag of a reference that names none.
const DefaultTag = "latest"

// MinPrefixLen is the shortest hex digest prefix accepted as a reference:
// shorter ones collide too easily to be safe in scripts.
const MinPrefixLen = 12

var (
	nameRE   = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,127}$`)
	tagRE    = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$`)
	hexRE    = regexp.MustCompile(`^[0-9a-f]+$`)
	digestRE = regexp.MustCompile(`^sha256:[0-9a-f]{64}$`)
)

// Ref is a parsed image reference. Exactly one of Digest or Name is set;
// HexPrefix is additionally set when a bare name also reads as a digest
// prefix, in which case a tag of that name wins over the prefix.
type Ref struct {
	Name      string
	Tag       string
	Digest    string
	HexPrefix string
}

// String renders the reference as the user would type it.
func (r Ref) String() string {
	if r.Digest != "" {
		return r.Digest
	}
	return r.Name + ":" + r.Tag
}

// ParseRef parses "name", "name:tag" (tag defaults to latest),
// "sha256:<64 hex>", or a hex digest prefix of at least MinPrefixLen
// characters.
func ParseRef(s string) (Ref, error) {
	if strings.HasPrefix(s, "sha256:") {
		if !digestRE.MatchString(s) {
			return Ref{}, errcode.New(errcode.InvalidName, "%q is not a digest (want sha256: and 64 lowercase hex digits)", s)
		}
		return Ref{Digest: s}, nil
	}
	name, tag, hasTag := strings.Cut(s, ":")
	if !hasTag {
		tag = DefaultTag
	}
	if err := ValidateName(name); err != nil {
		return Ref{}, err
	}
	if err := ValidateTag(tag); err != nil {
		return Ref{}, err
	}
	ref := Ref{Name: name, Tag: tag}
	if !hasTag && len(name) >= MinPrefixLen && len(name) <= 64 && hexRE.MatchString(name) {
		ref.HexPrefix = name
	}
	return ref, nil
}

// ValidateName checks an image name: lowercase letters, digits, '.', '_'
// and '-', starting with a letter or digit, at most 128 characters. The
// name "sha256" is reserved: "sha256:<x>" must always read as a digest.
func ValidateName(name string) error {
	if !nameRE.MatchString(name) || name == "sha256" {
		return errcode.New(errcode.InvalidName, "invalid image name %q", name).
			WithHint("use lowercase letters, digits, '.', '_' and '-', starting with a letter or digit (at most 128 characters)")
	}
	return nil
}

// ValidateTag checks a tag: letters, digits, '.', '_' and '-', not starting
// with '.' or '-', at most 128 characters.
func ValidateTag(tag string) error {
	if !tagRE.MatchString(tag) {
		return errcode.New(errcode.InvalidName, "invalid tag %q", tag).
			WithHint("use letters, digits, '.', '_' and '-', not starting with '.' or '-' (at most 128 characters)")
	}
	return nil
}

// ValidateDigest checks "sha256:<64 lowercase hex>".
func ValidateDigest(d string) error {
	if !digestRE.MatchString(d) {
		return errcode.New(errcode.InvalidName, "%q is not a digest (want sha256: and 64 lowercase hex digits)", d)
	}
	return nil
}
