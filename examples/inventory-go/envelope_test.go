package main

import (
	"encoding/json"
	"strings"
	"testing"
)

// Vectors from Kinshasa's own deterministic_id (kinshasa/schemas/envelope.py).
func TestDeterministicIDMatchesKinshasa(t *testing.T) {
	for _, c := range []struct {
		parts []string
		want  string
	}{
		{[]string{"applied", "x"}, "df403436-9033-5374-ad1d-8823e367d290"},
		{[]string{"compensated", "6f1c2a8e-0000-4000-8000-000000000001"}, "596f146a-38bd-5f47-b4ee-d7ec5c06bc3d"},
	} {
		if got := deterministicID(c.parts...); got != c.want {
			t.Errorf("deterministicID(%q) = %s, want %s", c.parts, got, c.want)
		}
	}
}

func TestParseEnvelopeRefusesUnknownAndMiscasedFields(t *testing.T) {
	good := `{"message_id":"6F1C2A8E-0000-4000-8000-000000000001","type":"inventory.add_item",` +
		`"actor":{"kind":"agent","id":"a"},"occurred_at":"2024-05-01T12:00:00+02:00"}`
	env, err := ParseEnvelope([]byte(good))
	if err != nil {
		t.Fatal(err)
	}
	if env.MessageID != "6f1c2a8e-0000-4000-8000-000000000001" || env.OccurredAt != "2024-05-01T10:00:00.000000Z" {
		t.Errorf("not canonical: %s %s", env.MessageID, env.OccurredAt)
	}
	for _, bad := range []string{
		strings.Replace(good, `"type"`, `"Type"`, 1),
		strings.Replace(good, `}`, `,"extra":1}`, 1),
		strings.Replace(good, `+02:00`, ``, 1),
		`[1]`, `not json`,
	} {
		if _, err := ParseEnvelope([]byte(bad)); err == nil {
			t.Errorf("accepted %s", bad)
		}
	}
}

func TestValidatePayloadAgainstDeclaredSchema(t *testing.T) {
	schema := payloadSchema(opAdjustStock)
	for payload, want := range map[string]string{
		`{"item_id":"i","delta":0}`:             "delta: must not be zero",
		`{"item_id":"i","delta":1.5}`:           "delta: must be of type integer",
		`{"item_id":"i","delta":2000000}`:       "delta: must be at most",
		`{"item_id":"i"}`:                       "delta: required",
		`{"item_id":"i","delta":1,"extra":1}`:   "extra: unknown field",
		`{"item_id":"i","delta":-3,"reason":1}`: "reason: must be of type string",
	} {
		_, problems := validatePayload(schema, json.RawMessage(payload))
		if len(problems) == 0 || !strings.Contains(strings.Join(problems, "; "), want) {
			t.Errorf("%s: got %v, want %q", payload, problems, want)
		}
	}
	ok, problems := validatePayload(payloadSchema(opAddItem), json.RawMessage(`{"sku":"A-1","name":"n"}`))
	if problems != nil || asInt64(ok["quantity"]) != 0 {
		t.Errorf("default quantity not applied: %v %v", ok, problems)
	}
	if _, problems := validatePayload(payloadSchema(opAddItem), json.RawMessage(`{"sku":"a-1","name":"n"}`)); problems == nil {
		t.Error("lower-case sku accepted")
	}
}
