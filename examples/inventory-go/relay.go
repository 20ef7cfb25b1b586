package main

// The outbox relay (contract section 7): publishes committed outbox rows in commit order with the
// idempotent, acks=all producer, and marks them sent only after the broker acknowledged them. A
// crash in between publishes them again on restart; their deterministic ids make the copies
// harmless to every reader.

import (
	"context"
	"errors"
	"hash/crc32"
	"log"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
)

const relayBatch = 500

// kinshasaPartitioner puts a key on the partition Kinshasa's own (librdkafka) producers choose:
// CRC-32 of the key modulo the partition count. The contract only asks that one key stays on one
// partition, but then a Python service and this one would agree on it too.
func kinshasaPartitioner() kgo.Partitioner {
	return kgo.BasicConsistentPartitioner(func(string) func(*kgo.Record, int) int {
		return func(r *kgo.Record, n int) int {
			if len(r.Key) == 0 {
				return 0
			}
			return int(crc32.ChecksumIEEE(r.Key) % uint32(n))
		}
	})
}

// Relay publishes the outbox.
type Relay struct {
	store    *Store
	producer *kgo.Client
	wake     chan struct{}
}

func NewRelay(store *Store, producer *kgo.Client) *Relay {
	return &Relay{store: store, producer: producer, wake: make(chan struct{}, 1)}
}

// Wake tells the relay there are new rows; it never blocks (one pending wake is enough).
func (r *Relay) Wake() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// Run publishes until ctx is done, then makes one last attempt to drain what is committed, so a
// clean shutdown leaves nothing for the next start.
func (r *Relay) Run(ctx context.Context) {
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		sent, err := r.publishPending(ctx)
		switch {
		case err != nil:
			log.Printf("relay: %v; retrying in %s", err, backoff)
			sleep(ctx, backoff)
			backoff = min(2*backoff, 5*time.Second)
		case sent == relayBatch:
			backoff = 100 * time.Millisecond // more rows waiting: go on at once
		default:
			backoff = 100 * time.Millisecond
			// A timer as well as the wake: a row committed while the wake was already consumed is
			// picked up within a second at worst.
			select {
			case <-ctx.Done():
			case <-r.wake:
			case <-time.After(time.Second):
			}
		}
	}
	drain, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for {
		sent, err := r.publishPending(drain)
		if err != nil {
			log.Printf("relay: unpublished rows left for the next start: %v", err)
			return
		}
		if sent < relayBatch {
			return
		}
	}
}

// publishPending publishes one batch of unpublished rows and marks the acknowledged prefix sent.
func (r *Relay) publishPending(ctx context.Context) (int, error) {
	rows, err := r.store.Pending(relayBatch)
	if err != nil || len(rows) == 0 {
		return 0, err
	}
	records := make([]*kgo.Record, len(rows))
	index := make(map[*kgo.Record]int, len(rows))
	for i, p := range rows {
		rec := &kgo.Record{Topic: p.Row.Topic, Key: []byte(p.Row.Key), Value: p.Row.Value}
		for _, h := range p.Row.Headers {
			rec.Headers = append(rec.Headers, kgo.RecordHeader{Key: h[0], Value: []byte(h[1])})
		}
		records[i] = rec
		index[rec] = i
	}
	produceCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	// Results come back in completion order, not in the order given: find the first failure by
	// position, and mark only the rows before it, so none is ever marked out of order.
	firstFailed, firstErr := len(rows), error(nil)
	for _, res := range r.producer.ProduceSync(produceCtx, records...) {
		if res.Err != nil && index[res.Record] < firstFailed {
			firstFailed, firstErr = index[res.Record], res.Err
		}
	}
	if firstFailed > 0 {
		if err := r.store.MarkSent(rows[firstFailed-1].Seq); err != nil {
			return 0, err
		}
	}
	if firstErr != nil {
		return firstFailed, errors.Join(errors.New("publish failed"), firstErr)
	}
	return len(rows), nil
}

func sleep(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}
