"""`gptedge serve`: an OpenAI-compatible HTTP server over gptedge bundles (needs the `serve` extra)."""
