"""The benchmark stage: inference latency, throughput, peak memory, FLOPs and utilisation per
configuration (precision × layout × compile × batch), and the fast path."""
