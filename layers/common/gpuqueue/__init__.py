"""gpuqueue: the shared domain package of the gpuqueue Lambdas (shipped as a layer)."""
