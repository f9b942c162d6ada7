"""Communication passes for tensor-parallel graphs: overlap collectives with compute, fuse what cannot."""
