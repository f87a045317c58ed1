"""Everything that uses a trained backbone: features, probes, k-NN, heads, retrieval, pictures."""
