"""Running a whole mesh locally: mesh config, child supervision, `shoal up`."""
