package main

// The wire envelope (contract sections 2 and 3): parsing it as strictly as Kinshasa's own
// JSON Schema does, the deterministic event ids, and the JSON encoding every event leaves with.

import (
	"bytes"
	"crypto/sha1"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"regexp"
	"slices"
	"strings"
	"time"
	"unicode/utf8"
)

// kinshasaNamespace is the UUID every deterministic message id derives from. It must never change:
// a re-emitted event only collides with its first emission (and is absorbed) if its id is the same.
var kinshasaNamespace = mustParseUUID("296c86a6-1483-5b7a-a87e-dd0e1594f7cc")

var (
	typeRE        = regexp.MustCompile(`^[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*){1,2}$`)
	traceparentRE = regexp.MustCompile(`^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$`)
)

// Actor says who caused a message; it is copied onto every event.
type Actor struct {
	Kind string `json:"kind"`
	ID   string `json:"id"`
}

// EntityRef names the entity a message is about; its key keeps that entity's messages in order.
type EntityRef struct {
	Service string `json:"service"`
	Type    string `json:"type"`
	ID      string `json:"id"`
}

// Key is the Kafka key, `service:id`.
func (e EntityRef) Key() string { return e.Service + ":" + e.ID }

// Envelope is one message on a commands or events topic. Field order matches Kinshasa's own
// serialisation so an event reads the same whichever language wrote it.
type Envelope struct {
	MessageID     string          `json:"message_id"`
	Type          string          `json:"type"`
	RunID         *string         `json:"run_id"`
	Actor         Actor           `json:"actor"`
	CausationID   *string         `json:"causation_id"`
	CorrelationID *string         `json:"correlation_id"`
	Entity        *EntityRef      `json:"entity"`
	OccurredAt    string          `json:"occurred_at"`
	Payload       json.RawMessage `json:"payload"`
	Traceparent   *string         `json:"traceparent"`
	SchemaVersion int             `json:"schema_version"`
}

// rawEnvelope is what a record is decoded into first: pointers tell a missing field from a zero one.
type rawEnvelope struct {
	MessageID     *string          `json:"message_id"`
	Type          *string          `json:"type"`
	RunID         *string          `json:"run_id"`
	Actor         *json.RawMessage `json:"actor"`
	CausationID   *string          `json:"causation_id"`
	CorrelationID *string          `json:"correlation_id"`
	Entity        *json.RawMessage `json:"entity"`
	OccurredAt    *string          `json:"occurred_at"`
	Payload       *json.RawMessage `json:"payload"`
	Traceparent   *string          `json:"traceparent"`
	SchemaVersion *int             `json:"schema_version"`
}

// decodeStrict decodes one JSON object into v, refusing fields other than `allowed` and trailing
// data, as the envelope schema's `additionalProperties: false` does. The keys are checked by hand
// because Go matches struct fields case-insensitively: "Message_Id" must be refused, not accepted.
func decodeStrict(data []byte, v any, allowed ...string) error {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(data, &fields); err != nil {
		return err
	}
	if fields == nil {
		return errors.New("must be a JSON object, not null")
	}
	for name := range fields {
		if !slices.Contains(allowed, name) {
			return fmt.Errorf("unknown field %q (allowed: %s)", name, strings.Join(allowed, ", "))
		}
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(v); err != nil {
		return err
	}
	if _, err := dec.Token(); err != io.EOF {
		return errors.New("trailing data after the JSON object")
	}
	return nil
}

var (
	envelopeFields = []string{"message_id", "type", "run_id", "actor", "causation_id", "correlation_id",
		"entity", "occurred_at", "payload", "traceparent", "schema_version"}
	actorFields  = []string{"kind", "id"}
	entityFields = []string{"service", "type", "id"}
)

func checkText(field string, value string, max int) error {
	if n := utf8.RuneCountInString(value); n < 1 || n > max {
		return fmt.Errorf("%s: must be 1 to %d characters, got %d", field, max, n)
	}
	return nil
}

// ParseEnvelope validates a record value as an envelope. An error means the record cannot be
// answered (there may be no entity to answer about): the caller dead-letters it.
func ParseEnvelope(data []byte) (*Envelope, error) {
	if !utf8.Valid(data) {
		return nil, errors.New("not UTF-8")
	}
	var raw rawEnvelope
	if err := decodeStrict(data, &raw, envelopeFields...); err != nil {
		return nil, fmt.Errorf("invalid envelope: %w", err)
	}
	var problems []string
	add := func(err error) {
		if err != nil {
			problems = append(problems, err.Error())
		}
	}
	env := &Envelope{SchemaVersion: 1, Payload: json.RawMessage("{}")}

	if raw.MessageID == nil {
		add(errors.New("message_id: required"))
	} else if id, err := canonicalUUID(*raw.MessageID); err != nil {
		add(fmt.Errorf("message_id: %w", err))
	} else {
		env.MessageID = id
	}
	if raw.Type == nil {
		add(errors.New("type: required"))
	} else if len(*raw.Type) > 200 || !typeRE.MatchString(*raw.Type) {
		add(fmt.Errorf("type: %q is not a dotted lowercase type such as 'inventory.add_item'", *raw.Type))
	} else {
		env.Type = *raw.Type
	}
	if raw.RunID != nil {
		add(checkText("run_id", *raw.RunID, 256))
		env.RunID = raw.RunID
	}
	if raw.Actor == nil || string(*raw.Actor) == "null" {
		add(errors.New("actor: required"))
	} else if err := decodeStrict(*raw.Actor, &env.Actor, actorFields...); err != nil {
		add(fmt.Errorf("actor: %w", err))
	} else {
		switch env.Actor.Kind {
		case "agent", "operator", "service", "system":
		default:
			add(fmt.Errorf("actor.kind: %q is not one of agent, operator, service, system", env.Actor.Kind))
		}
		add(checkText("actor.id", env.Actor.ID, 256))
	}
	if raw.CausationID != nil {
		if id, err := canonicalUUID(*raw.CausationID); err != nil {
			add(fmt.Errorf("causation_id: %w", err))
		} else {
			env.CausationID = &id
		}
	}
	if raw.CorrelationID != nil {
		add(checkText("correlation_id", *raw.CorrelationID, 256))
		env.CorrelationID = raw.CorrelationID
	}
	if raw.Entity != nil && string(*raw.Entity) != "null" {
		var entity EntityRef
		if err := decodeStrict(*raw.Entity, &entity, entityFields...); err != nil {
			add(fmt.Errorf("entity: %w", err))
		} else {
			add(checkText("entity.service", entity.Service, 256))
			add(checkText("entity.type", entity.Type, 256))
			add(checkText("entity.id", entity.ID, 256))
			env.Entity = &entity
		}
	}
	if raw.OccurredAt == nil {
		add(errors.New("occurred_at: required"))
	} else if at, err := time.Parse(time.RFC3339Nano, *raw.OccurredAt); err != nil {
		add(fmt.Errorf("occurred_at: not an RFC 3339 timestamp with an offset: %w", err))
	} else {
		env.OccurredAt = formatTime(at)
	}
	if raw.Payload != nil {
		if p := bytes.TrimSpace(*raw.Payload); len(p) == 0 || p[0] != '{' {
			add(errors.New("payload: must be a JSON object"))
		} else {
			env.Payload = p
		}
	}
	if raw.Traceparent != nil {
		m := traceparentRE.FindStringSubmatch(*raw.Traceparent)
		if m == nil {
			add(errors.New("traceparent: not a W3C traceparent"))
		} else if strings.Trim(m[1], "0") == "" || strings.Trim(m[2], "0") == "" {
			add(errors.New("traceparent: W3C forbids an all-zero trace id or parent id"))
		}
		env.Traceparent = raw.Traceparent
	}
	if raw.SchemaVersion != nil {
		if *raw.SchemaVersion < 1 {
			add(errors.New("schema_version: must be at least 1"))
		}
		env.SchemaVersion = *raw.SchemaVersion
	}
	if len(problems) > 0 {
		return nil, fmt.Errorf("invalid envelope: %s", strings.Join(problems, "; "))
	}
	return env, nil
}

// Derive builds an event about the command `c`: same run, actor, correlation and trace, caused
// by the command (contract section 3). The entity is passed in: a compensated event carries the
// forward step's entity.
func (c *Envelope) Derive(eventType, messageID string, entity *EntityRef, payload any, at time.Time) (*Envelope, error) {
	body, err := marshalJSON(payload)
	if err != nil {
		return nil, err
	}
	causation := c.MessageID
	return &Envelope{
		MessageID: messageID, Type: eventType, RunID: c.RunID, Actor: c.Actor,
		CausationID: &causation, CorrelationID: c.CorrelationID, Entity: entity,
		OccurredAt: formatTime(at), Payload: body, Traceparent: c.Traceparent, SchemaVersion: 1,
	}, nil
}

// formatTime is RFC 3339 in UTC with microseconds, the form Kinshasa itself writes.
func formatTime(t time.Time) string {
	return t.UTC().Format("2006-01-02T15:04:05.000000Z07:00")
}

// marshalJSON is compact JSON without Go's default HTML escaping of <, > and &: Kinshasa does not
// escape them, and the declaration digest is defined over the unescaped form.
func marshalJSON(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimRight(buf.Bytes(), "\n"), nil
}

// deterministicID is uuid5(NS, compact JSON array of the parts): `["applied","<command id>"]`.
func deterministicID(parts ...string) string {
	name, err := marshalJSON(parts)
	if err != nil {
		panic(err) // a []string always encodes
	}
	h := sha1.New()
	h.Write(kinshasaNamespace[:])
	h.Write(name)
	var u [16]byte
	copy(u[:], h.Sum(nil))
	u[6] = (u[6] & 0x0f) | 0x50 // version 5
	u[8] = (u[8] & 0x3f) | 0x80 // RFC 4122 variant
	return formatUUID(u)
}

func formatUUID(u [16]byte) string {
	s := hex.EncodeToString(u[:])
	return s[0:8] + "-" + s[8:12] + "-" + s[12:16] + "-" + s[16:20] + "-" + s[20:32]
}

func parseUUID(s string) ([16]byte, error) {
	var u [16]byte
	t := strings.ToLower(s)
	t = strings.TrimPrefix(t, "urn:uuid:")
	if strings.HasPrefix(t, "{") && strings.HasSuffix(t, "}") {
		t = t[1 : len(t)-1]
	}
	hexDigits := strings.ReplaceAll(t, "-", "")
	if len(hexDigits) != 32 {
		return u, fmt.Errorf("%q is not a UUID", s)
	}
	if _, err := hex.Decode(u[:], []byte(hexDigits)); err != nil {
		return u, fmt.Errorf("%q is not a UUID", s)
	}
	return u, nil
}

// canonicalUUID is the lowercase hyphenated form: ids are hashed into deterministic ids, so two
// spellings of one UUID must become one string first.
func canonicalUUID(s string) (string, error) {
	u, err := parseUUID(s)
	if err != nil {
		return "", err
	}
	return formatUUID(u), nil
}

func mustParseUUID(s string) [16]byte {
	u, err := parseUUID(s)
	if err != nil {
		panic(err)
	}
	return u
}
