"""The test suite of deepnoise (a package, so `tests.fixtures` imports from tests and benchmarks alike)."""
