package main

// Payload validation against the very JSON Schema the service declares (contract section 9): the
// gateway checks a payload before it accepts a write, but a command can reach this topic by other
// roads, so the service checks again and answers `.rejected` with code VALIDATION. Validating
// against the declared schema itself, rather than a hand copy, keeps the two from drifting apart.
// Only the keywords this service declares are implemented.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"reflect"
	"regexp"
	"sort"
	"strings"
	"sync"
	"unicode/utf8"
)

var (
	patternsMu sync.Mutex
	patterns   = map[string]*regexp.Regexp{}
)

func compiled(pattern string) *regexp.Regexp {
	patternsMu.Lock()
	defer patternsMu.Unlock()
	re, ok := patterns[pattern]
	if !ok {
		re = regexp.MustCompile(pattern)
		patterns[pattern] = re
	}
	return re
}

// validatePayload checks a payload object against an object schema. It returns the payload with
// declared defaults filled in, or the problems found, each naming its field.
func validatePayload(schema map[string]any, payload json.RawMessage) (map[string]any, []string) {
	dec := json.NewDecoder(bytes.NewReader(payload))
	dec.UseNumber() // keep 3 and 3.5 apart: `integer` must refuse the latter
	var value any
	if err := dec.Decode(&value); err != nil {
		return nil, []string{fmt.Sprintf("(payload): not JSON: %v", err)}
	}
	object, ok := value.(map[string]any)
	if !ok {
		return nil, []string{"(payload): must be a JSON object"}
	}
	var problems []string
	properties, _ := schema["properties"].(map[string]any)
	if schema["additionalProperties"] == false {
		var unknown []string
		for name := range object {
			if _, declared := properties[name]; !declared {
				unknown = append(unknown, name)
			}
		}
		sort.Strings(unknown)
		for _, name := range unknown {
			problems = append(problems, fmt.Sprintf("%s: unknown field; the payload takes only %s",
				name, strings.Join(sortedKeys(properties), ", ")))
		}
	}
	for _, name := range asStrings(schema["required"]) {
		if _, present := object[name]; !present {
			problems = append(problems, fmt.Sprintf("%s: required", name))
		}
	}
	for _, name := range sortedKeys(properties) {
		sub, _ := properties[name].(map[string]any)
		v, present := object[name]
		if !present {
			if def, has := sub["default"]; has {
				object[name] = def
			}
			continue
		}
		if problem := checkValue(sub, v); problem != "" {
			problems = append(problems, fmt.Sprintf("%s: %s", name, problem))
		}
	}
	if len(problems) > 0 {
		return nil, problems
	}
	return object, nil
}

// checkValue checks one scalar value; "" means it is valid. The first failing keyword decides the
// message, in the author's words when the schema has an errorMessage for it.
func checkValue(schema map[string]any, v any) string {
	failed, detail := firstFailure(schema, v)
	if failed == "" {
		return ""
	}
	switch custom := schema["errorMessage"].(type) {
	case string:
		return custom
	case map[string]any:
		if msg, ok := custom[failed].(string); ok {
			return msg
		}
	}
	return detail
}

func firstFailure(schema map[string]any, v any) (keyword, detail string) {
	if t, ok := schema["type"]; ok {
		var allowed []string
		if s, isString := t.(string); isString {
			allowed = []string{s}
		} else {
			allowed = asStrings(t)
		}
		matched := false
		for _, name := range allowed {
			matched = matched || hasType(v, name)
		}
		if !matched {
			return "type", fmt.Sprintf("must be of type %s, got %s", strings.Join(allowed, " or "), jsonTypeOf(v))
		}
	}
	if s, isString := v.(string); isString {
		n := utf8.RuneCountInString(s)
		if limit, ok := number(schema["minLength"]); ok && float64(n) < limit {
			return "minLength", fmt.Sprintf("must be at least %v characters, got %d", limit, n)
		}
		if limit, ok := number(schema["maxLength"]); ok && float64(n) > limit {
			return "maxLength", fmt.Sprintf("must be at most %v characters, got %d", limit, n)
		}
		if pattern, ok := schema["pattern"].(string); ok && !compiled(pattern).MatchString(s) {
			return "pattern", fmt.Sprintf("%q does not match %s", s, pattern)
		}
	}
	if x, isNumber := number(v); isNumber {
		if limit, ok := number(schema["minimum"]); ok && x < limit {
			return "minimum", fmt.Sprintf("must be at least %v, got %v", limit, v)
		}
		if limit, ok := number(schema["maximum"]); ok && x > limit {
			return "maximum", fmt.Sprintf("must be at most %v, got %v", limit, v)
		}
		if limit, ok := number(schema["exclusiveMinimum"]); ok && x <= limit {
			return "exclusiveMinimum", fmt.Sprintf("must be more than %v, got %v", limit, v)
		}
		if limit, ok := number(schema["exclusiveMaximum"]); ok && x >= limit {
			return "exclusiveMaximum", fmt.Sprintf("must be less than %v, got %v", limit, v)
		}
	}
	if enum, ok := schema["enum"].([]any); ok {
		found := false
		for _, option := range enum {
			found = found || sameValue(option, v)
		}
		if !found {
			return "enum", fmt.Sprintf("must be one of %v", enum)
		}
	}
	if c, ok := schema["const"]; ok && !sameValue(c, v) {
		return "const", fmt.Sprintf("must be %v", c)
	}
	if not, ok := schema["not"].(map[string]any); ok {
		if c, hasConst := not["const"]; hasConst && sameValue(c, v) {
			return "not", fmt.Sprintf("must not be %v", c)
		}
	}
	return "", ""
}

func hasType(v any, name string) bool {
	switch name {
	case "integer":
		x, ok := number(v)
		return ok && x == math.Trunc(x)
	case "number":
		_, ok := number(v)
		return ok
	default:
		return jsonTypeOf(v) == name
	}
}

func jsonTypeOf(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case bool:
		return "boolean"
	case string:
		return "string"
	case json.Number, int, int64, float64:
		return "number"
	case []any:
		return "array"
	case map[string]any:
		return "object"
	}
	return fmt.Sprintf("%T", v)
}

// number reads a JSON number from a payload (json.Number) or a declared schema (int, float64).
func number(v any) (float64, bool) {
	switch x := v.(type) {
	case json.Number:
		f, err := x.Float64()
		return f, err == nil
	case int:
		return float64(x), true
	case int64:
		return float64(x), true
	case float64:
		return x, true
	}
	return 0, false
}

// sameValue is JSON equality: 0 and 0.0 are the same number.
func sameValue(a, b any) bool {
	x, aNumber := number(a)
	y, bNumber := number(b)
	if aNumber || bNumber {
		return aNumber && bNumber && x == y
	}
	return reflect.DeepEqual(a, b)
}

func asStrings(v any) []string {
	switch x := v.(type) {
	case []string:
		return x
	case []any:
		var out []string
		for _, item := range x {
			if s, ok := item.(string); ok {
				out = append(out, s)
			}
		}
		return out
	}
	return nil
}

func sortedKeys(m map[string]any) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// asInt64 reads an integer the validator already accepted (3, 3.0 and 3e0 are all 3).
func asInt64(v any) int64 {
	f, _ := number(v)
	return int64(f)
}
