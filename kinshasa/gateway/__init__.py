"""The GraphQL gateway: principals, runs, circuit breaker, quarantine, egress approval."""
