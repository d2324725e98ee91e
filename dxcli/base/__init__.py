"""Base layer: errors, the answer parser, the conversation template, JSON IO and image files.
Everything else builds on these; they import nothing else from dx."""
