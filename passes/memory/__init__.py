"""Memory planning: liveness of every intermediate and its place in one activation arena."""
