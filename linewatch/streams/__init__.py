"""Redis streams of a line: record types, the embedded server, the client and the writer."""
