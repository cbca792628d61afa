"""The metrics endpoint: the collector rendering state at scrape time, the HTTP(S) server."""
