package main

// The service's own store: one bbolt file. Everything one command does is written in one bbolt
// transaction (contract sections 6 and 7): its inbox row, the new item version, the applied-step or
// compensation record, and the outbox row holding the event's bytes. bbolt has a single writer,
// so transactions commit one after another and outbox sequence numbers are commit order.
//
// Nothing is ever updated in place or deleted, except the relay's high-water mark: a change to an
// item is a new version, a removal is a tombstone version, a compensation is a record of its own.

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	bolt "go.etcd.io/bbolt"
)

var (
	bucketInbox         = []byte("inbox")         // command message_id -> inboxRow
	bucketItems         = []byte("items")         // item id -> (version, big-endian) -> itemVersion
	bucketRuns          = []byte("runs")          // run id -> item id -> "" (every item a run wrote)
	bucketSteps         = []byte("steps")         // applied event id -> appliedStep
	bucketCompensations = []byte("compensations") // forward event id -> compensationRow
	bucketOutbox        = []byte("outbox")        // sequence (big-endian) -> outboxRow
	bucketRelay         = []byte("relay")         // "sent_through" -> last published sequence
	keySentThrough      = []byte("sent_through")
)

const (
	statusActive  = "active"
	statusRemoved = "removed"
)

// itemVersion is one version of an item; without Operation it is the read model (section 8).
type itemVersion struct {
	ID         string  `json:"id"`
	Version    int64   `json:"version"`
	SKU        string  `json:"sku"`
	Name       string  `json:"name"`
	Quantity   int64   `json:"quantity"`
	Status     string  `json:"status"`
	RunID      *string `json:"run_id"`
	CommandID  string  `json:"command_id"`
	Actor      string  `json:"actor"`
	RecordedAt string  `json:"recorded_at"`
	Operation  string  `json:"operation,omitempty"`
}

// state is what `GET /entities/item/{id}` answers, and what `before` and `after` carry. A removed
// item reads as absent (nil), like one that never existed; its history stays under /versions.
func (v *itemVersion) state() *itemVersion {
	if v == nil || v.Status == statusRemoved {
		return nil
	}
	s := *v
	s.Operation = ""
	return &s
}

type inboxRow struct {
	Type      string `json:"type"`
	HandledAt string `json:"handled_at"`
	Outcome   string `json:"outcome"`
	EventID   string `json:"event_id"`
}

// appliedStep is the service's own record of a forward step: all a compensate names is the
// event id, and this is where the inverse finds what the step did.
type appliedStep struct {
	EventID     string          `json:"event_id"`
	CommandID   string          `json:"command_id"`
	CommandType string          `json:"command_type"`
	Entity      EntityRef       `json:"entity"`
	RunID       *string         `json:"run_id"`
	Actor       string          `json:"actor"`
	Data        json.RawMessage `json:"data"`
	AppliedAt   string          `json:"applied_at"`
}

type compensationRow struct {
	ForwardEventID      string  `json:"forward_event_id"`
	CompensateCommandID string  `json:"compensate_command_id"`
	RunID               *string `json:"run_id"`
	Actor               string  `json:"actor"`
	CompensatedAt       string  `json:"compensated_at"`
	// Event holds the compensated event's bytes, so a later compensate of the same step answers
	// with the very same message.
	Event []byte `json:"event"`
}

type outboxRow struct {
	MessageID string      `json:"message_id"`
	Topic     string      `json:"topic"`
	Key       string      `json:"key"`
	Value     []byte      `json:"value"`
	Headers   [][2]string `json:"headers"`
}

// Store is the bbolt database.
type Store struct {
	db *bolt.DB
}

func OpenStore(dir string) (*Store, error) {
	// The timeout turns "another process holds the file" into an error instead of a hang.
	db, err := bolt.Open(filepath.Join(dir, "inventory.db"), 0o600, &bolt.Options{Timeout: 2 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("open store in %s: %w", dir, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, name := range [][]byte{bucketInbox, bucketItems, bucketRuns, bucketSteps,
			bucketCompensations, bucketOutbox, bucketRelay} {
			if _, err := tx.CreateBucketIfNotExists(name); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, err
	}
	return &Store{db: db}, nil
}

func (s *Store) Close() error { return s.db.Close() }

// Tx is one command's transaction.
type Tx struct {
	tx *bolt.Tx
}

// Update runs fn in one read-write transaction: all of it commits, or none of it.
func (s *Store) Update(fn func(*Tx) error) error {
	return s.db.Update(func(tx *bolt.Tx) error { return fn(&Tx{tx}) })
}

// View runs fn in a read-only transaction, which never blocks the writer.
func (s *Store) View(fn func(*Tx) error) error {
	return s.db.View(func(tx *bolt.Tx) error { return fn(&Tx{tx}) })
}

func u64(n uint64) []byte {
	b := make([]byte, 8)
	binary.BigEndian.PutUint64(b, n)
	return b
}

func getJSON[T any](b *bolt.Bucket, key []byte) (*T, error) {
	raw := b.Get(key)
	if raw == nil {
		return nil, nil
	}
	var v T
	if err := json.Unmarshal(raw, &v); err != nil {
		return nil, fmt.Errorf("corrupt %s row: %w", key, err)
	}
	return &v, nil
}

func putJSON(b *bolt.Bucket, key []byte, v any) error {
	raw, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return b.Put(key, raw)
}

// Seen says whether a command was already handled: its inbox row is there.
func (t *Tx) Seen(messageID string) bool {
	return t.tx.Bucket(bucketInbox).Get([]byte(messageID)) != nil
}

func (t *Tx) RecordInbox(messageID string, row inboxRow) error {
	return putJSON(t.tx.Bucket(bucketInbox), []byte(messageID), row)
}

// LatestItem is the newest version of an item, tombstones included; nil if it never existed.
func (t *Tx) LatestItem(id string) (*itemVersion, error) {
	versions := t.tx.Bucket(bucketItems).Bucket([]byte(id))
	if versions == nil {
		return nil, nil
	}
	_, raw := versions.Cursor().Last()
	if raw == nil {
		return nil, nil
	}
	var v itemVersion
	if err := json.Unmarshal(raw, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

// ItemVersions is every version of an item, oldest first (keys are big-endian version numbers).
func (t *Tx) ItemVersions(id string) ([]itemVersion, error) {
	versions := t.tx.Bucket(bucketItems).Bucket([]byte(id))
	if versions == nil {
		return nil, nil
	}
	var out []itemVersion
	err := versions.ForEach(func(_, raw []byte) error {
		var v itemVersion
		if err := json.Unmarshal(raw, &v); err != nil {
			return err
		}
		out = append(out, v)
		return nil
	})
	return out, err
}

// AppendVersion writes v as the item's next version and indexes it under its run.
func (t *Tx) AppendVersion(v *itemVersion) error {
	versions, err := t.tx.Bucket(bucketItems).CreateBucketIfNotExists([]byte(v.ID))
	if err != nil {
		return err
	}
	key := u64(uint64(v.Version))
	if versions.Get(key) != nil {
		// Versions are never overwritten: a second writer of the same version is a bug.
		return fmt.Errorf("item %s already has a version %d", v.ID, v.Version)
	}
	if err := putJSON(versions, key, v); err != nil {
		return err
	}
	if v.RunID != nil {
		byRun, err := t.tx.Bucket(bucketRuns).CreateBucketIfNotExists([]byte(*v.RunID))
		if err != nil {
			return err
		}
		return byRun.Put([]byte(v.ID), []byte{})
	}
	return nil
}

// ItemsOfRun is every item id that the run wrote a version of.
func (t *Tx) ItemsOfRun(runID string) []string {
	byRun := t.tx.Bucket(bucketRuns).Bucket([]byte(runID))
	if byRun == nil {
		return nil
	}
	var ids []string
	_ = byRun.ForEach(func(k, _ []byte) error {
		ids = append(ids, string(k))
		return nil
	})
	return ids
}

func (t *Tx) Step(eventID string) (*appliedStep, error) {
	return getJSON[appliedStep](t.tx.Bucket(bucketSteps), []byte(eventID))
}

func (t *Tx) PutStep(step appliedStep) error {
	b := t.tx.Bucket(bucketSteps)
	if b.Get([]byte(step.EventID)) != nil {
		return fmt.Errorf("step %s is already recorded", step.EventID)
	}
	return putJSON(b, []byte(step.EventID), step)
}

func (t *Tx) Compensation(forwardEventID string) (*compensationRow, error) {
	return getJSON[compensationRow](t.tx.Bucket(bucketCompensations), []byte(forwardEventID))
}

func (t *Tx) PutCompensation(row compensationRow) error {
	b := t.tx.Bucket(bucketCompensations)
	if b.Get([]byte(row.ForwardEventID)) != nil {
		// One compensation per step: undoing a step twice is what this record prevents.
		return fmt.Errorf("step %s is already compensated", row.ForwardEventID)
	}
	return putJSON(b, []byte(row.ForwardEventID), row)
}

// Enqueue appends an outbox row; its sequence number is its place in commit order.
func (t *Tx) Enqueue(row outboxRow) error {
	b := t.tx.Bucket(bucketOutbox)
	seq, err := b.NextSequence()
	if err != nil {
		return err
	}
	return putJSON(b, u64(seq), row)
}

// pendingRow is an outbox row the relay has yet to publish.
type pendingRow struct {
	Seq uint64
	Row outboxRow
}

// Pending is up to `limit` unpublished outbox rows, in commit order.
func (s *Store) Pending(limit int) ([]pendingRow, error) {
	var rows []pendingRow
	err := s.db.View(func(tx *bolt.Tx) error {
		var after uint64
		if raw := tx.Bucket(bucketRelay).Get(keySentThrough); raw != nil {
			after = binary.BigEndian.Uint64(raw)
		}
		c := tx.Bucket(bucketOutbox).Cursor()
		for k, v := c.Seek(u64(after + 1)); k != nil && len(rows) < limit; k, v = c.Next() {
			var row outboxRow
			if err := json.Unmarshal(v, &row); err != nil {
				return err
			}
			rows = append(rows, pendingRow{Seq: binary.BigEndian.Uint64(k), Row: row})
		}
		return nil
	})
	return rows, err
}

// MarkSent records that every row up to seq reached the broker. Rows are published in sequence
// order, so one high-water mark marks them all.
func (s *Store) MarkSent(seq uint64) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketRelay)
		if raw := b.Get(keySentThrough); raw != nil && binary.BigEndian.Uint64(raw) >= seq {
			return errors.New("relay mark went backwards")
		}
		return b.Put(keySentThrough, u64(seq))
	})
}
