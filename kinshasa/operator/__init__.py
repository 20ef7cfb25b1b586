"""The operator's command line: `kinshasa revert`, `runs`, `run`, `incidents`, `incident`, `policy` and
`proposal`, each spoken to the gateway's public GraphQL with an operator key and nothing else."""
