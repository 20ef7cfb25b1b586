"""An example Kinshasa service outside Kinshasa: support tickets, declared in `tickets.service`."""
