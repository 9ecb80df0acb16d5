"""The benchmarks and the memory model; results, settings and how to run each: README.md here."""
