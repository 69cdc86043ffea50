"""Native model families, one module per architecture (see ember.registry for the dispatch)."""
