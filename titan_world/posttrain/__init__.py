"""titan-world."""
