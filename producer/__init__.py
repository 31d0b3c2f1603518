"""What clients touch: the HTTP API, the Python client, the CLI. Never imports torch."""
