"""The durability pattern every component honours: database engines, outbox, inbox, DLQ, receipts."""
