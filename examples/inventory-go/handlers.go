package main

// One command in, one transaction out (contract sections 3 to 6). A forward command is validated,
// applied and answered with `.applied` or `.rejected`; a compensate command finds its forward step in
// this service's own store and runs the declared inverse, answering `.compensated` or
// `.compensation_failed`. The inbox row, the domain write, the step or compensation record and the
// outbox row of the answer commit together, so a redelivered command has no second effect and no
// effect is ever without its event.

import (
	"encoding/json"
	"fmt"
	"log"
	"strings"
	"time"
	"unicode/utf8"
)

const (
	codeValidation       = "VALIDATION"
	codeUnknownOperation = "UNKNOWN_OPERATION"
	codeItemExists       = "ITEM_EXISTS"
	codeItemNotFound     = "ITEM_NOT_FOUND"
	codeInsufficient     = "INSUFFICIENT_STOCK"
)

// poisonError marks a record that cannot be answered (no entity to answer about, an event on the
// commands topic, a compensate without a forward event id): it goes to the DLQ, not to a retry.
type poisonError struct{ reason string }

func (e *poisonError) Error() string { return e.reason }

// domainError is a refusal by the domain: a forward command is rejected with its code, an
// inverse answers compensation_failed with its reason.
type domainError struct{ code, reason string }

func (e *domainError) Error() string { return e.reason }

// Service handles the commands of the inventory service.
type Service struct {
	store       *Store
	eventsTopic string
	onCommit    func() // wakes the relay: there is something new in the outbox
	now         func() time.Time
}

// stamp is the provenance every item version carries, so "what did run X touch" is a lookup.
type stamp struct {
	run                                     *string
	commandID, actor, recordedAt, operation string
}

func (st stamp) version(base itemVersion) *itemVersion {
	base.RunID, base.CommandID, base.Actor = st.run, st.commandID, st.actor
	base.RecordedAt, base.Operation = st.recordedAt, st.operation
	return &base
}

// Handle handles one command in one transaction and says what it did ("applied", "rejected",
// "compensated", "compensation_failed" or "duplicate"). A *poisonError means dead-letter the
// record; any other error is passing (the store) and the caller retries the same record.
func (s *Service) Handle(cmd *Envelope) (string, error) {
	parts := strings.Split(cmd.Type, ".")
	if parts[0] != serviceName {
		return "", &poisonError{fmt.Sprintf("%s is not a command of %s: it was sent to the wrong topic",
			cmd.Type, serviceName)}
	}
	suffix := ""
	if len(parts) == 3 {
		suffix = parts[2]
	}
	if suffix != "" && suffix != "compensate" {
		return "", &poisonError{fmt.Sprintf("%s is not a command (suffix %q): events go on events topics",
			cmd.Type, suffix)}
	}
	if cmd.Entity == nil {
		return "", &poisonError{"commands must name their entity {service, type, id}: the Kafka key and " +
			"every event derive from it"}
	}
	now := s.now()
	actor := cmd.Actor.Kind + ":" + cmd.Actor.ID
	st := stamp{run: cmd.RunID, commandID: cmd.MessageID, actor: actor, recordedAt: formatTime(now),
		operation: cmd.Type}

	var kind string
	err := s.store.Update(func(tx *Tx) error {
		if tx.Seen(cmd.MessageID) {
			kind = "duplicate"
			return nil
		}
		var (
			event *Envelope
			err   error
			raw   []byte // an earlier answer re-sent as it was
		)
		if suffix == "compensate" {
			kind, event, raw, err = s.compensate(tx, cmd, parts[1], st, now)
		} else {
			kind, event, err = s.forward(tx, cmd, parts[1], st, now)
		}
		if err != nil {
			return err
		}
		row, err := outboxRowFor(s.eventsTopic, event, raw)
		if err != nil {
			return err
		}
		if err := tx.Enqueue(row); err != nil {
			return err
		}
		return tx.RecordInbox(cmd.MessageID, inboxRow{Type: cmd.Type, HandledAt: st.recordedAt,
			Outcome: kind, EventID: row.MessageID})
	})
	if err != nil {
		return "", err
	}
	if kind == "duplicate" {
		log.Printf("command %s (%s) was already handled; no second effect", cmd.MessageID, cmd.Type)
	} else {
		s.onCommit()
	}
	return kind, nil
}

// outboxRowFor is the outbox row of an event: keyed by its entity, with its type and id in headers
// as Kinshasa's own producer sets them. `raw`, when given, is the event's already-encoded bytes.
func outboxRowFor(topic string, event *Envelope, raw []byte) (outboxRow, error) {
	if raw == nil {
		var err error
		if raw, err = marshalJSON(event); err != nil {
			return outboxRow{}, err
		}
	}
	headers := [][2]string{{"type", event.Type}, {"message_id", event.MessageID}}
	if event.Traceparent != nil {
		headers = append(headers, [2]string{"traceparent", *event.Traceparent})
	}
	return outboxRow{MessageID: event.MessageID, Topic: topic, Key: event.Entity.Key(), Value: raw,
		Headers: headers}, nil
}

// forward

func (s *Service) forward(tx *Tx, cmd *Envelope, op string, st stamp, now time.Time) (string, *Envelope, error) {
	commandType := serviceName + "." + op
	schema := payloadSchema(op)
	if schema == nil {
		return s.rejected(cmd, commandType, codeUnknownOperation, fmt.Sprintf(
			"%s is not an operation of %s; known: %s", commandType, serviceName,
			strings.Join(operationNames(), ", ")), now)
	}
	payload, problems := validatePayload(schema, cmd.Payload)
	if problems != nil {
		return s.rejected(cmd, commandType, codeValidation, fmt.Sprintf(
			"invalid %s payload: %s", commandType, strings.Join(problems, "; ")), now)
	}
	entity := cmd.Entity
	if entity.Service != serviceName || entity.Type != itemType {
		return s.rejected(cmd, commandType, codeValidation, fmt.Sprintf(
			"entity %s/%s does not match %s, which acts on %s/%s",
			entity.Service, entity.Type, commandType, serviceName, itemType), now)
	}
	if named, ok := payload["item_id"].(string); ok && named != entity.ID {
		return s.rejected(cmd, commandType, codeValidation, fmt.Sprintf(
			"entity id %q differs from payload item_id=%q: the envelope's entity must be the item the "+
				"payload names", entity.ID, named), now)
	}

	latest, err := tx.LatestItem(entity.ID)
	if err != nil {
		return "", nil, err
	}
	var (
		data    map[string]any
		written *itemVersion
	)
	switch op {
	case opAddItem:
		data, written, err = addItem(latest, entity.ID, payload, st)
	case opAdjustStock:
		data, written, err = adjustStock(latest, entity.ID, payload, st)
	case opRenameItem:
		data, written, err = renameItem(latest, entity.ID, payload, st)
	}
	if refused, ok := err.(*domainError); ok {
		return s.rejected(cmd, commandType, refused.code, refused.reason, now)
	}
	if err != nil {
		return "", nil, err
	}
	if err := tx.AppendVersion(written); err != nil {
		return "", nil, err
	}
	// The applied payload: what the inverse needs, plus before -> after as the read API shows them.
	data["before"] = latest.state()
	data["after"] = written.state()
	eventID := deterministicID("applied", cmd.MessageID)
	event, err := cmd.Derive(commandType+".applied", eventID, entity, data, now)
	if err != nil {
		return "", nil, err
	}
	err = tx.PutStep(appliedStep{EventID: eventID, CommandID: cmd.MessageID, CommandType: commandType,
		Entity: *entity, RunID: cmd.RunID, Actor: st.actor, Data: event.Payload, AppliedAt: st.recordedAt})
	return "applied", event, err
}

func (s *Service) rejected(cmd *Envelope, commandType, code, reason string, now time.Time) (string, *Envelope, error) {
	log.Printf("rejected %s %s: %s (%s)", cmd.Type, cmd.MessageID, reason, code)
	event, err := cmd.Derive(commandType+".rejected", deterministicID("rejected", cmd.MessageID), cmd.Entity,
		map[string]any{"reason": truncate(reason, 2000), "code": code}, now)
	return "rejected", event, err
}

// compensate

type compensatePayload struct {
	ForwardEventID string `json:"forward_event_id"`
	ForwardType    string `json:"forward_type"`
}

func (s *Service) compensate(tx *Tx, cmd *Envelope, op string, st stamp, now time.Time) (string, *Envelope, []byte, error) {
	commandType := serviceName + "." + op
	var request compensatePayload
	if err := decodeStrict(cmd.Payload, &request, "forward_event_id", "forward_type"); err != nil {
		// Without a forward event id there is nothing to name in a compensation_failed.
		return "", nil, nil, &poisonError{fmt.Sprintf("%s payload: %v", cmd.Type, err)}
	}
	forwardID, err := canonicalUUID(request.ForwardEventID)
	if err != nil {
		return "", nil, nil, &poisonError{fmt.Sprintf("%s payload: forward_event_id: %v", cmd.Type, err)}
	}
	if !typeRE.MatchString(request.ForwardType) || !strings.HasSuffix(request.ForwardType, ".applied") {
		return "", nil, nil, &poisonError{fmt.Sprintf("%s payload: forward_type: must be an applied event "+
			"type such as 'inventory.add_item.applied', got %q", cmd.Type, request.ForwardType)}
	}
	request.ForwardEventID = forwardID
	failed := func(reason string) (string, *Envelope, []byte, error) {
		log.Printf("compensation of %s failed: %s", forwardID, reason)
		event, err := cmd.Derive(commandType+".compensation_failed",
			deterministicID("compensation_failed", cmd.MessageID), cmd.Entity,
			map[string]any{"forward_event_id": forwardID, "forward_type": request.ForwardType,
				"reason": truncate(reason, 2000)}, now)
		return "compensation_failed", event, nil, err
	}

	if expected := commandType + ".applied"; request.ForwardType != expected {
		return failed(fmt.Sprintf("%s cannot undo a %s: send %s.compensate instead", cmd.Type,
			request.ForwardType, strings.TrimSuffix(request.ForwardType, ".applied")))
	}
	if payloadSchema(op) == nil {
		return failed(fmt.Sprintf("%s is not an operation of %s", commandType, serviceName))
	}
	step, err := tx.Step(forwardID)
	if err != nil {
		return "", nil, nil, err
	}
	if step == nil || step.CommandType != commandType {
		return failed(fmt.Sprintf("%s has no applied %s step with event id %s: check the forward event id "+
			"(only applied steps can be undone)", serviceName, commandType, forwardID))
	}
	done, err := tx.Compensation(forwardID)
	if err != nil {
		return "", nil, nil, err
	}
	if done != nil {
		// Already undone: answer with the very same compensated event and change nothing.
		var earlier Envelope
		if err := json.Unmarshal(done.Event, &earlier); err != nil {
			return "", nil, nil, err
		}
		log.Printf("step %s was already compensated; answering again", forwardID)
		return "compensated", &earlier, done.Event, nil
	}

	latest, err := tx.LatestItem(step.Entity.ID)
	if err != nil {
		return "", nil, nil, err
	}
	var written *itemVersion
	switch op {
	case opAddItem:
		written, err = removeAddedItem(latest, step, st)
	case opAdjustStock:
		written, err = restoreQuantity(latest, step, st)
	case opRenameItem:
		written, err = restoreName(latest, step, st)
	}
	if refused, ok := err.(*domainError); ok {
		return failed(refused.reason)
	}
	if err != nil {
		return "", nil, nil, err
	}
	if err := tx.AppendVersion(written); err != nil {
		return "", nil, nil, err
	}
	// Keyed by the forward event, not by this command: every re-sent compensate of the step
	// answers with the same id, so the coordinator counts the step once.
	entity := step.Entity
	event, err := cmd.Derive(commandType+".compensated", deterministicID("compensated", forwardID), &entity,
		map[string]any{"forward_event_id": forwardID, "forward_type": request.ForwardType}, now)
	if err != nil {
		return "", nil, nil, err
	}
	raw, err := marshalJSON(event)
	if err != nil {
		return "", nil, nil, err
	}
	err = tx.PutCompensation(compensationRow{ForwardEventID: forwardID, CompensateCommandID: cmd.MessageID,
		RunID: cmd.RunID, Actor: st.actor, CompensatedAt: st.recordedAt, Event: raw})
	return "compensated", event, raw, err
}

// the domain: each inverse sits right below the forward handler it undoes

func missing(id string, latest *itemVersion) *domainError {
	if latest != nil {
		return &domainError{codeItemNotFound, fmt.Sprintf("item %s was removed (by command %s): check the "+
			"id returned by addItem; its history is at /entities/item/%s/versions", id, latest.CommandID, id)}
	}
	return &domainError{codeItemNotFound, fmt.Sprintf("item %s does not exist: check the id returned by addItem", id)}
}

func changedSince(v *itemVersion, what string) *domainError {
	return &domainError{"ITEM_CHANGED", fmt.Sprintf("item %s changed since %s (now name %q, quantity %d, by "+
		"command %s): revert that change first, or fix the item by hand", v.ID, what, v.Name, v.Quantity, v.CommandID)}
}

func addItem(latest *itemVersion, id string, p map[string]any, st stamp) (map[string]any, *itemVersion, error) {
	if latest != nil {
		return nil, nil, &domainError{codeItemExists, fmt.Sprintf("item %s already exists: adding it again "+
			"would overwrite it; use a fresh id (the gateway mints one per addItem)", id)}
	}
	sku, name, quantity := p["sku"].(string), p["name"].(string), asInt64(p["quantity"])
	written := st.version(itemVersion{ID: id, Version: 1, SKU: sku, Name: name, Quantity: quantity,
		Status: statusActive})
	return map[string]any{"item_id": id, "sku": sku, "name": name, "quantity": quantity}, written, nil
}

// removeAddedItem tombstones the item the step added, if its name and quantity are as it left them.
func removeAddedItem(latest *itemVersion, step *appliedStep, st stamp) (*itemVersion, error) {
	var added struct {
		Name     string `json:"name"`
		Quantity int64  `json:"quantity"`
	}
	if err := json.Unmarshal(step.Data, &added); err != nil {
		return nil, err
	}
	if latest.state() == nil {
		return nil, missing(step.Entity.ID, latest)
	}
	if latest.Name != added.Name || latest.Quantity != added.Quantity {
		return nil, changedSince(latest, "it was added")
	}
	next := *latest
	next.Version, next.Status = latest.Version+1, statusRemoved
	return st.version(next), nil
}

func adjustStock(latest *itemVersion, id string, p map[string]any, st stamp) (map[string]any, *itemVersion, error) {
	if latest.state() == nil {
		return nil, nil, missing(id, latest)
	}
	delta := asInt64(p["delta"])
	after := latest.Quantity + delta
	if after < 0 {
		return nil, nil, &domainError{codeInsufficient, fmt.Sprintf("item %s has %d in stock; taking %d would "+
			"leave %d: take at most %d", id, latest.Quantity, -delta, after, latest.Quantity)}
	}
	next := *latest
	next.Version, next.Quantity = latest.Version+1, after
	data := map[string]any{"item_id": id, "delta": delta, "old_quantity": latest.Quantity, "new_quantity": after}
	if reason, ok := p["reason"].(string); ok {
		data["reason"] = reason
	}
	return data, st.version(next), nil
}

// restoreQuantity sets the quantity back, if it is still what the adjustment made it.
func restoreQuantity(latest *itemVersion, step *appliedStep, st stamp) (*itemVersion, error) {
	var adjusted struct {
		OldQuantity int64 `json:"old_quantity"`
		NewQuantity int64 `json:"new_quantity"`
	}
	if err := json.Unmarshal(step.Data, &adjusted); err != nil {
		return nil, err
	}
	if latest.state() == nil {
		return nil, missing(step.Entity.ID, latest)
	}
	if latest.Quantity != adjusted.NewQuantity {
		return nil, changedSince(latest, fmt.Sprintf("the adjustment left its quantity at %d", adjusted.NewQuantity))
	}
	next := *latest
	next.Version, next.Quantity = latest.Version+1, adjusted.OldQuantity
	return st.version(next), nil
}

func renameItem(latest *itemVersion, id string, p map[string]any, st stamp) (map[string]any, *itemVersion, error) {
	if latest.state() == nil {
		return nil, nil, missing(id, latest)
	}
	name := p["name"].(string)
	next := *latest
	next.Version, next.Name = latest.Version+1, name
	return map[string]any{"item_id": id, "old_name": latest.Name, "new_name": name}, st.version(next), nil
}

// restoreName gives the item its old name back, if nobody renamed it since.
func restoreName(latest *itemVersion, step *appliedStep, st stamp) (*itemVersion, error) {
	var renamed struct {
		OldName string `json:"old_name"`
		NewName string `json:"new_name"`
	}
	if err := json.Unmarshal(step.Data, &renamed); err != nil {
		return nil, err
	}
	if latest.state() == nil {
		return nil, missing(step.Entity.ID, latest)
	}
	if latest.Name != renamed.NewName {
		return nil, changedSince(latest, fmt.Sprintf("the rename to %q", renamed.NewName))
	}
	next := *latest
	next.Version, next.Name = latest.Version+1, renamed.OldName
	return st.version(next), nil
}

func truncate(s string, max int) string {
	if utf8.RuneCountInString(s) <= max {
		return s
	}
	return string([]rune(s)[:max])
}
