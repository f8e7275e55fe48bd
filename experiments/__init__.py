"""Scripts that reproduce the tables, studies and benchmarks (each runs as `python experiments/NAME.py`);
a package so that one script imports another as `experiments.NAME`, never through sys.path edits."""
