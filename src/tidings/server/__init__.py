"""I/O: the lean WebSocket protocol, the HTTP API, metrics and the process lifecycle."""
