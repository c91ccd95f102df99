package gateway

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
)

// decodeBody reads r's JSON body into v, capped at limit bytes. Malformed
// JSON (bad syntax, truncated, trailing data) is 400 bad_request; JSON of
// the wrong shape (unknown field, wrong type) is 422 validation_error; an
// oversized body is 413. An empty body decodes as {} when allowEmpty.
func decodeBody(w http.ResponseWriter, r *http.Request, limit int64, v any, allowEmpty bool) error {
	if ct := r.Header.Get("Content-Type"); ct != "" {
		mt, _, err := mime.ParseMediaType(ct)
		if err != nil || (mt != "application/json" && !isJSONSuffix(mt)) {
			return apiErr(http.StatusBadRequest, CodeBadRequest, fmt.Sprintf("Content-Type %q is not application/json", ct))
		}
	}
	data, err := io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return toAPIError(err)
		}
		return apiErr(http.StatusBadRequest, CodeBadRequest, "reading the request body failed")
	}
	if len(bytes.TrimSpace(data)) == 0 {
		if allowEmpty {
			data = []byte("{}")
		} else {
			return apiErr(http.StatusBadRequest, CodeBadRequest, "the request body is empty; a JSON object is expected")
		}
	}
	return decodeJSON(data, v)
}

// decodeJSON decodes one JSON object from data into v, with decodeBody's
// error mapping.
func decodeJSON(data []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var syn *json.SyntaxError
		var typ *json.UnmarshalTypeError
		switch {
		case errors.As(err, &syn):
			return apiErr(http.StatusBadRequest, CodeBadRequest, fmt.Sprintf("malformed JSON at byte %d: %v", syn.Offset, err))
		case errors.As(err, &typ):
			field := typ.Field
			if field == "" {
				return apiErr(http.StatusUnprocessableEntity, CodeValidation, "the body must be a JSON object")
			}
			return apiErr(http.StatusUnprocessableEntity, CodeValidation,
				fmt.Sprintf("field %q must be of type %s, not %s", field, jsonTypeName(typ.Type.Kind().String()), typ.Value)).
				withDetails(map[string]string{"field": field})
		case errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, io.EOF):
			return apiErr(http.StatusBadRequest, CodeBadRequest, "malformed JSON: the body ends too early")
		default:
			// encoding/json reports unknown fields only as text.
			return apiErr(http.StatusUnprocessableEntity, CodeValidation, err.Error())
		}
	}
	if dec.More() {
		return apiErr(http.StatusBadRequest, CodeBadRequest, "malformed JSON: trailing data after the object")
	}
	if _, err := dec.Token(); err != io.EOF {
		return apiErr(http.StatusBadRequest, CodeBadRequest, "malformed JSON: trailing data after the object")
	}
	return nil
}

func isJSONSuffix(mt string) bool { return len(mt) > 5 && mt[len(mt)-5:] == "+json" }

// jsonTypeName names Go kinds as JSON types for messages.
func jsonTypeName(kind string) string {
	switch kind {
	case "string":
		return "string"
	case "bool":
		return "boolean"
	case "int", "int8", "int16", "int32", "int64", "uint", "uint8", "uint16", "uint32", "uint64", "float32", "float64":
		return "number"
	case "slice", "array":
		return "array"
	default:
		return "object"
	}
}

// validation is a 422 about one field.
func validation(field, format string, args ...any) *APIError {
	return apiErr(http.StatusUnprocessableEntity, CodeValidation, fmt.Sprintf(format, args...)).
		withDetails(map[string]string{"field": field})
}
