"""The public API over HTTP: a real `serve run` answering rank, consent and errors; the edge's guards; OpenAPI; keys."""
