"""Speed and memory benchmarks (`make bench`): features, training throughput, fused ensembles."""
