"""Training stages (align, instruct, prpo) and the launcher that runs them on 1..N processes."""
