// Package fcspec checks Firecracker API request bodies and --config-file
// documents against Firecracker's own API description (Swagger 2.0, the
// 1.17.0-dev head and the v1.16.1 release, embedded). The driver's tests and
// the Firecracker stand-in use it, so neither trusts the driver's idea of
// what Firecracker accepts.
//
// Beyond the schemas it enforces two things Firecracker does that Swagger
// does not say: request bodies reject unknown fields (Firecracker's serde
// structs deny them), and a config file's top-level keys must be ones
// Firecracker knows (it silently ignores the rest, so a typo there is a
// device that never appears).
package fcspec

import (
	"embed"
	"encoding/json"
	"fmt"
	"slices"
	"strings"

	"github.com/getkin/kin-openapi/openapi2"
	"github.com/getkin/kin-openapi/openapi2conv"
	"github.com/getkin/kin-openapi/openapi3"
)

// Names of the embedded descriptions.
const (
	Head    = "firecracker-api.yaml"
	V1_16_1 = "firecracker-api-v1.16.1.yaml"
)

//go:embed firecracker-api.yaml firecracker-api-v1.16.1.yaml
var files embed.FS

// Spec is one loaded Firecracker API description.
type Spec struct {
	// Name is the embedded file it came from.
	Name string
	// Version is the description's info.version.
	Version string
	doc     *openapi3.T
}

// Load parses the embedded description called name (Head or V1_16_1).
func Load(name string) (*Spec, error) {
	data, err := files.ReadFile(name)
	if err != nil {
		return nil, fmt.Errorf("no embedded Firecracker API description %q: %w", name, err)
	}
	var doc2 openapi2.T
	if err := openapi2.UnmarshalFromData(data, &doc2); err != nil {
		return nil, fmt.Errorf("parsing %s: %w", name, err)
	}
	doc3, err := openapi2conv.ToV3(&doc2)
	if err != nil {
		return nil, fmt.Errorf("converting %s to OpenAPI 3: %w", name, err)
	}
	return &Spec{Name: name, Version: doc2.Info.Version, doc: doc3}, nil
}

// LoadAll loads every embedded description, newest first.
func LoadAll() ([]*Spec, error) {
	var specs []*Spec
	for _, name := range []string{Head, V1_16_1} {
		s, err := Load(name)
		if err != nil {
			return nil, err
		}
		specs = append(specs, s)
	}
	return specs, nil
}

// Schema returns the named definition (such as "Drive").
func (s *Spec) Schema(name string) (*openapi3.Schema, error) {
	ref, ok := s.doc.Components.Schemas[name]
	if !ok || ref.Value == nil {
		return nil, fmt.Errorf("%s has no definition %q", s.Name, name)
	}
	return ref.Value, nil
}

// RequestSchema returns the body schema of the operation that serves
// method on urlPath, a concrete path such as "/drives/rootfs".
func (s *Spec) RequestSchema(method, urlPath string) (*openapi3.Schema, error) {
	for tmpl, item := range s.doc.Paths.Map() {
		if !matchPath(tmpl, urlPath) {
			continue
		}
		op := item.GetOperation(strings.ToUpper(method))
		if op == nil {
			return nil, fmt.Errorf("%s: %s %s is not an operation", s.Name, method, urlPath)
		}
		if op.RequestBody == nil || op.RequestBody.Value == nil {
			return nil, fmt.Errorf("%s: %s %s takes no body", s.Name, method, urlPath)
		}
		mt := op.RequestBody.Value.Content.Get("application/json")
		if mt == nil || mt.Schema == nil || mt.Schema.Value == nil {
			return nil, fmt.Errorf("%s: %s %s has no JSON body schema", s.Name, method, urlPath)
		}
		return mt.Schema.Value, nil
	}
	return nil, fmt.Errorf("%s: no path matches %s", s.Name, urlPath)
}

// matchPath reports whether a concrete path fits a template whose
// "{name}" segments stand for one non-empty segment each.
func matchPath(tmpl, p string) bool {
	ts, ps := strings.Split(tmpl, "/"), strings.Split(p, "/")
	if len(ts) != len(ps) {
		return false
	}
	for i := range ts {
		if strings.HasPrefix(ts[i], "{") && strings.HasSuffix(ts[i], "}") {
			if ps[i] == "" {
				return false
			}
			continue
		}
		if ts[i] != ps[i] {
			return false
		}
	}
	return true
}

// ValidateRequest checks body as the JSON body of method urlPath.
func (s *Spec) ValidateRequest(method, urlPath string, body []byte) error {
	schema, err := s.RequestSchema(method, urlPath)
	if err != nil {
		return err
	}
	return validate(schema, body, method+" "+urlPath)
}

// ValidateDefinition checks body against the named definition.
func (s *Spec) ValidateDefinition(name string, body []byte) error {
	schema, err := s.Schema(name)
	if err != nil {
		return err
	}
	return validate(schema, body, name)
}

// ValidateConfigFile checks a document for `firecracker --config-file`: a
// FullVmConfiguration whose every top-level key Firecracker knows.
func (s *Spec) ValidateConfigFile(body []byte) error {
	return s.ValidateDefinition("FullVmConfiguration", body)
}

// ConfigFileKeys lists the top-level keys Firecracker reads from a config
// file.
func (s *Spec) ConfigFileKeys() []string {
	schema, err := s.Schema("FullVmConfiguration")
	if err != nil {
		return nil
	}
	keys := make([]string, 0, len(schema.Properties))
	for k := range schema.Properties {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

func validate(schema *openapi3.Schema, body []byte, what string) error {
	var v any
	if err := json.Unmarshal(body, &v); err != nil {
		return fmt.Errorf("%s: body is not JSON: %w", what, err)
	}
	if err := schema.VisitJSON(v, openapi3.MultiErrors()); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	if unknown := unknownFields(schema, v, ""); len(unknown) > 0 {
		return fmt.Errorf("%s: unknown field(s) %s", what, strings.Join(unknown, ", "))
	}
	return nil
}

// unknownFields walks v alongside schema and lists the object keys that
// the schema does not declare, as dotted paths. Objects whose schema allows
// additional properties (string maps such as metrics "properties") are
// free-form and not walked.
func unknownFields(schema *openapi3.Schema, v any, prefix string) []string {
	var out []string
	switch v := v.(type) {
	case map[string]any:
		if len(schema.Properties) == 0 && schema.AdditionalProperties.Schema != nil {
			return nil
		}
		keys := make([]string, 0, len(v))
		for k := range v {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for _, k := range keys {
			prop, ok := schema.Properties[k]
			if !ok || prop.Value == nil {
				out = append(out, prefix+k)
				continue
			}
			out = append(out, unknownFields(prop.Value, v[k], prefix+k+".")...)
		}
	case []any:
		if schema.Items == nil || schema.Items.Value == nil {
			return nil
		}
		for i, e := range v {
			out = append(out, unknownFields(schema.Items.Value, e, fmt.Sprintf("%s[%d].", strings.TrimSuffix(prefix, "."), i))...)
		}
	}
	return out
}
