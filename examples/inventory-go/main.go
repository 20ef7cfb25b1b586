// Command inventory-go is a Kinshasa service written in Go, with no Kinshasa code in it: it keeps
// the wire contract of docs/service-contract.md with franz-go (Kafka) and bbolt (its store).
//
// Start-up follows the contract's order: open the store, serve the read API, create the topics,
// publish the declaration on kinshasa.catalogue, and only then consume commands. SIGTERM stops
// consuming, commits what was handled, lets the relay publish what was committed, and exits.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
)

const (
	commandsTopic  = "kinshasa.commands." + serviceName
	eventsTopic    = "kinshasa.events." + serviceName
	consumerGroup  = "kinshasa.svc." + serviceName
	dlqTopic       = consumerGroup + ".dlq"
	catalogueTopic = "kinshasa.catalogue"
)

func envOr(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

func main() {
	bootstrap := flag.String("bootstrap", envOr("KINSHASA_KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
		"Kafka bootstrap servers (env KINSHASA_KAFKA_BOOTSTRAP)")
	dataDir := flag.String("data", "inventory-data", "directory of the bbolt store (created if missing)")
	httpAddr := flag.String("http", "127.0.0.1:0", "listen address of the read API (port 0: any free port)")
	flag.Parse()
	log.SetFlags(log.LstdFlags | log.Lmicroseconds | log.LUTC)
	log.SetPrefix("inventory ")
	if err := run(*bootstrap, *dataDir, *httpAddr); err != nil {
		log.Printf("stopped: %v", err)
		os.Exit(1)
	}
}

func run(bootstrap, dataDir, httpAddr string) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		return err
	}
	store, err := OpenStore(dataDir)
	if err != nil {
		return err
	}
	defer store.Close()

	// The read API first: its URL goes into the declaration.
	listener, err := net.Listen("tcp", httpAddr)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", httpAddr, err)
	}
	baseURL := "http://" + listener.Addr().String()
	reads := &ReadAPI{store: store}
	server := &http.Server{Handler: reads.Handler(), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := server.Serve(listener); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Printf("read api: %v", err)
		}
	}()
	defer func() {
		shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = server.Shutdown(shutdown)
	}()

	producer, err := kgo.NewClient(
		kgo.SeedBrokers(bootstrap),
		kgo.ClientID("inventory-go"),
		// Idempotence is franz-go's default; acks=all is what makes "acknowledged" mean durable.
		kgo.RequiredAcks(kgo.AllISRAcks()),
		kgo.RecordPartitioner(kinshasaPartitioner()),
		kgo.RecordDeliveryTimeout(30*time.Second),
	)
	if err != nil {
		return err
	}
	defer producer.Close()

	if err := retry(ctx, "create topics", func() error { return ensureTopics(ctx, producer) }); err != nil {
		return stoppedEarly(ctx, err)
	}
	if err := retry(ctx, "publish the declaration", func() error {
		return publishDeclaration(ctx, producer, baseURL)
	}); err != nil {
		return stoppedEarly(ctx, err)
	}

	relay := NewRelay(store, producer)
	relayCtx, stopRelay := context.WithCancel(context.Background())
	var relayDone sync.WaitGroup
	relayDone.Go(func() { relay.Run(relayCtx) })
	defer func() { stopRelay(); relayDone.Wait() }() // runs before producer.Close: the relay drains first

	consumer, err := kgo.NewClient(
		kgo.SeedBrokers(bootstrap),
		kgo.ClientID("inventory-go"),
		kgo.ConsumerGroup(consumerGroup),
		kgo.ConsumeTopics(commandsTopic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		// Offsets are committed by hand, only after a record's transaction committed (section 5).
		kgo.DisableAutoCommit(),
		// No rebalance while a polled batch is being handled and committed, so a commit never lands
		// on a partition this member has already lost.
		kgo.BlockRebalanceOnPoll(),
		kgo.FetchMaxWait(time.Second),
	)
	if err != nil {
		return err
	}
	svc := &Service{store: store, eventsTopic: eventsTopic, onCommit: relay.Wake, now: time.Now}
	c := &consumerLoop{consumer: consumer, producer: producer, svc: svc}
	relay.Wake() // rows committed before a crash are published now

	reads.ready.Store(true)
	fmt.Printf("inventory ready %s\n", baseURL)
	c.run(ctx)
	reads.ready.Store(false)
	log.Printf("stopping")
	consumer.CloseAllowingRebalance()
	return nil
}

// stoppedEarly is nil when a signal interrupted start-up (a clean stop), else err.
func stoppedEarly(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		log.Printf("stopped before consuming")
		return nil
	}
	return err
}

// retry runs fn until it succeeds or ctx ends: the broker may still be starting.
func retry(ctx context.Context, what string, fn func() error) error {
	backoff := 200 * time.Millisecond
	for {
		err := fn()
		if err == nil {
			return nil
		}
		log.Printf("%s: %v; retrying in %s", what, err, backoff)
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w", what, err)
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

// ensureTopics creates the service's topics and the catalogue when they are missing, with the
// partitions and retention Kinshasa's own `kinshasa topics ensure` gives them.
func ensureTopics(ctx context.Context, client *kgo.Client) error {
	forever := map[string]*string{
		"cleanup.policy": kadm.StringPtr("delete"), "retention.ms": kadm.StringPtr("-1"),
		"retention.bytes": kadm.StringPtr("-1"), "min.insync.replicas": kadm.StringPtr("1"),
	}
	compacted := map[string]*string{
		"cleanup.policy": kadm.StringPtr("compact"), "retention.ms": kadm.StringPtr("-1"),
		"min.insync.replicas": kadm.StringPtr("1"),
	}
	admin := kadm.NewClient(client)
	for _, t := range []struct {
		name       string
		partitions int32
		configs    map[string]*string
	}{
		{commandsTopic, 6, forever},
		{eventsTopic, 6, forever},
		{dlqTopic, 1, forever},
		{catalogueTopic, 1, compacted},
	} {
		created, err := admin.CreateTopic(ctx, t.partitions, 1, t.configs, t.name)
		switch {
		case errors.Is(err, kerr.TopicAlreadyExists):
		case err != nil:
			return fmt.Errorf("topic %s: %w", t.name, err)
		default:
			log.Printf("created topic %s (%d partitions)", created.Topic, created.NumPartitions)
		}
	}
	return nil
}

// publishDeclaration puts the declaration on kinshasa.catalogue and waits for the broker's ack,
// so the gateway can know the operations before any command is consumed.
func publishDeclaration(ctx context.Context, producer *kgo.Client, readURL string) error {
	value, err := declaration(readURL)
	if err != nil {
		return err
	}
	publish, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	rec := &kgo.Record{Topic: catalogueTopic, Key: []byte(serviceName), Value: value}
	return producer.ProduceSync(publish, rec).FirstErr()
}

// consumerLoop consumes the commands topic, one record at a time in partition order.
type consumerLoop struct {
	consumer *kgo.Client
	producer *kgo.Client
	svc      *Service
}

func (c *consumerLoop) run(ctx context.Context) {
	for {
		fetches := c.consumer.PollFetches(ctx)
		if fetches.IsClientClosed() || ctx.Err() != nil {
			c.consumer.AllowRebalance()
			return
		}
		fetches.EachError(func(topic string, partition int32, err error) {
			log.Printf("fetch %s/%d: %v", topic, partition, err)
		})
		var handled []*kgo.Record
		stopped := false
		for iter := fetches.RecordIter(); !iter.Done() && !stopped; {
			rec := iter.Next()
			if err := c.process(ctx, rec); err != nil {
				stopped = true // shutting down mid-retry: this record stays uncommitted
			} else {
				handled = append(handled, rec)
			}
		}
		c.commit(handled)
		c.consumer.AllowRebalance()
		if stopped {
			return
		}
	}
}

// commit commits the offsets of handled records; it runs even while shutting down, because
// everything handled is already durable in the store.
func (c *consumerLoop) commit(records []*kgo.Record) {
	if len(records) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.consumer.CommitRecords(ctx, records...); err != nil {
		// Not fatal: the records come again and the inbox absorbs them.
		log.Printf("commit offsets: %v", err)
	}
}

// process handles one record, retrying a passing failure on the same record rather than skipping
// it (later commands of its entity must not overtake it). It returns an error only when ctx ends.
func (c *consumerLoop) process(ctx context.Context, rec *kgo.Record) error {
	backoff := 100 * time.Millisecond
	for {
		err := c.handle(ctx, rec)
		if err == nil {
			return nil
		}
		log.Printf("record %s/%d@%d: %v; retrying in %s", rec.Topic, rec.Partition, rec.Offset, err, backoff)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

func (c *consumerLoop) handle(ctx context.Context, rec *kgo.Record) error {
	env, err := ParseEnvelope(rec.Value)
	if err != nil {
		return c.deadLetter(ctx, rec, err.Error())
	}
	kind, err := c.svc.Handle(env)
	var poison *poisonError
	if errors.As(err, &poison) {
		return c.deadLetter(ctx, rec, poison.reason)
	}
	if err != nil {
		return err
	}
	log.Printf("%s %s -> %s", env.Type, env.MessageID, kind)
	return nil
}

// deadLetter puts a record that cannot be answered on the DLQ topic with its original key and
// headers, plus why and where from (Kinshasa's own `kinshasa.dlq.*` headers), and moves on.
func (c *consumerLoop) deadLetter(ctx context.Context, rec *kgo.Record, reason string) error {
	log.Printf("dead-lettering %s/%d@%d: %s", rec.Topic, rec.Partition, rec.Offset, reason)
	headers := append([]kgo.RecordHeader{}, rec.Headers...)
	for _, h := range [][2]string{
		{"error", truncate(reason, 2000)},
		{"reason", "invalid"},
		{"group", consumerGroup},
		{"source_topic", rec.Topic},
		{"source_partition", strconv.Itoa(int(rec.Partition))},
		{"source_offset", strconv.FormatInt(rec.Offset, 10)},
		{"failed_at", formatTime(time.Now())},
	} {
		headers = append(headers, kgo.RecordHeader{Key: "kinshasa.dlq." + h[0], Value: []byte(h[1])})
	}
	publish, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	letter := &kgo.Record{Topic: dlqTopic, Key: rec.Key, Value: rec.Value, Headers: headers}
	return c.producer.ProduceSync(publish, letter).FirstErr()
}
