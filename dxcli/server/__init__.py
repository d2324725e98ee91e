"""`dx serve`: one warm model behind HTTP (a page, `/v1/detect`, OpenAI-compatible chat completions).

A top layer beside the CLI. The CLI reaches it from `dx serve` alone, through `options` (light:
it refuses an unsafe host before anything heavy loads) and `run.serve` (the entry point).
This file imports nothing, so that importing `options` stays instant.
"""
