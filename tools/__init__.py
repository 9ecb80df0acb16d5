"""Everything around the package that is not shipped with it: the demo (`python -m tools.demo`), the bundled
model, the corpora and their builders, the Axolotl set-up, the GPU check, and the benchmarks
(`tools/benchmarks/`). Run each as a module from the repository root."""
