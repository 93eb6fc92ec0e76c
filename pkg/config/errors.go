package config

import (
	"fmt"
	"slices"
	"strings"
)

// FieldError is one problem with a configuration, naming the field it is
// in.
type FieldError struct {
	// File is the configuration file, when it came from one (Load).
	File string
	// Line is the line of the field in the YAML text, 1-based; 0 when the
	// problem was found in a Config that was not parsed, or has no line.
	Line int
	// Field is the field's path in YAML keys, "egress.ports",
	// "policy.allow[2]", "policy.peers.laptop.limits.burst"; empty for
	// problems with the text as a whole, such as YAML syntax errors.
	Field string
	// Msg says what is wrong.
	Msg string
}

// Error formats e as "[FILE: ][line N: ][FIELD: ]MSG".
func (e *FieldError) Error() string {
	var b strings.Builder
	if e.File != "" {
		b.WriteString(e.File)
		b.WriteString(": ")
	}
	if e.Line > 0 {
		fmt.Fprintf(&b, "line %d: ", e.Line)
	}
	if e.Field != "" {
		b.WriteString(e.Field)
		b.WriteString(": ")
	}
	b.WriteString(e.Msg)
	return b.String()
}

// Errors is every problem found in a configuration. Parse, Load and
// Validate return it, never empty, so that a user fixes a file in one go
// rather than one error per run.
type Errors []*FieldError

// Error lists the problems one per line.
func (es Errors) Error() string {
	lines := make([]string, len(es))
	for i, e := range es {
		lines[i] = e.Error()
	}
	return strings.Join(lines, "\n")
}

// Unwrap lets errors.As find each *FieldError.
func (es Errors) Unwrap() []error {
	out := make([]error, len(es))
	for i, e := range es {
		out[i] = e
	}
	return out
}

// Fields returns the field paths of the problems, in order, for tests and
// for tools that highlight fields.
func (es Errors) Fields() []string {
	out := make([]string, len(es))
	for i, e := range es {
		out[i] = e.Field
	}
	return out
}

// sortByLine orders problems as they appear in the file; those without a
// line keep their order and go last.
func (es Errors) sortByLine() {
	slices.SortStableFunc(es, func(a, b *FieldError) int {
		switch {
		case a.Line == b.Line:
			return 0
		case a.Line == 0:
			return 1
		case b.Line == 0:
			return -1
		}
		return a.Line - b.Line
	})
}

// problems collects FieldErrors.
type problems struct {
	errs Errors
}

func (p *problems) add(field, format string, args ...any) {
	p.errs = append(p.errs, &FieldError{Field: field, Msg: fmt.Sprintf(format, args...)})
}

func (p *problems) addLine(line int, field, format string, args ...any) {
	p.errs = append(p.errs, &FieldError{Line: line, Field: field, Msg: fmt.Sprintf(format, args...)})
}

func (p *problems) err() error {
	if len(p.errs) == 0 {
		return nil
	}
	return p.errs
}
