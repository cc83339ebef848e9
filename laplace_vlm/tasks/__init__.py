"""Tasks on top of the posterior: zero-shot classification and retrieval with uncertainty."""
