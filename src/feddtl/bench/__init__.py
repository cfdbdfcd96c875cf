"""Benchmark suites: methods x scenarios x seeds, run resumably in parallel, tabulated and plotted."""
