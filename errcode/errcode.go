// Package errcode gives every hyphae and dimension error a stable code.
//
// Codes are grouped by hundreds: E1xx prerequisites, E2xx configuration,
// E3xx processes, E4xx root filesystems, E5xx the registry, E6xx
// orchestration, E7xx kernels, E8xx networking and the jailer, E9xx the
// dimension host↔guest protocol and agent. A code never changes meaning once
// released, so scripts may match on it.
//
// Errors render as "E402: no project marker found in ./x (...)" and carry an
// optional hint for the user. They work with errors.Is (two errors match when
// their codes match) and errors.As.
package errcode

import (
	"errors"
	"fmt"
)

// Code is a stable error code such as "E402".
type Code string

// Error is an error with a stable code, a message, an optional hint and an
// optional cause.
type Error struct {
	Code    Code
	Message string
	Hint    string
	Err     error
}

// New returns an error with the given code and a formatted message.
func New(code Code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// Wrap returns an error with the given code whose cause is err.
// Wrap returns nil when err is nil.
func Wrap(code Code, err error, format string, args ...any) error {
	if err == nil {
		return nil
	}
	return &Error{Code: code, Message: fmt.Sprintf(format, args...), Err: err}
}

// WithHint sets the hint shown below the message and returns e.
func (e *Error) WithHint(hint string) *Error {
	e.Hint = hint
	return e
}

// Error renders "CODE: message: cause".
func (e *Error) Error() string {
	s := string(e.Code) + ": " + e.Message
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

// Unwrap returns the cause.
func (e *Error) Unwrap() error { return e.Err }

// Is reports whether target is an *Error with the same code, so that
// errors.Is(err, errcode.New(errcode.NoProjectMarker, "")) matches any
// error of that code.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Code == e.Code
}

// CodeOf returns the code of the outermost *Error in err's chain, or "" when
// there is none.
func CodeOf(err error) Code {
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return ""
}

// HasCode reports whether any error in err's chain, joined errors
// included, carries code.
func HasCode(err error, code Code) bool {
	return find(err, func(e *Error) bool { return e.Code == code }) != nil
}

// HintOf returns the first hint found in err's chain, joined errors
// included (a failed build joined with a failed cleanup keeps its hint).
func HintOf(err error) string {
	if e := find(err, func(e *Error) bool { return e.Hint != "" }); e != nil {
		return e.Hint
	}
	return ""
}

// find returns the first *Error in err's chain, depth first through joined
// errors, for which match is true.
func find(err error, match func(*Error) bool) *Error {
	for err != nil {
		if e, ok := err.(*Error); ok && match(e) {
			return e
		}
		switch u := err.(type) {
		case interface{ Unwrap() error }:
			err = u.Unwrap()
		case interface{ Unwrap() []error }:
			for _, inner := range u.Unwrap() {
				if e := find(inner, match); e != nil {
					return e
				}
			}
			return nil
		default:
			return nil
		}
	}
	return nil
}
