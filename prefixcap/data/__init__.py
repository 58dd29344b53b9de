"""Built-in dataset sources."""
