"""Model definitions that graftc compiles and benchmarks."""
