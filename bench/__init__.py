"""The bench scripts, run from the repository root as modules: `python -m bench.speed`, `python -m bench.quality`, ...

Each script measures one thing and (most) rewrite their own section of docs/benchmarks.md through
`bench._report.write_section`; `bench.classical` holds the classical peers they share, `bench.peers`
the tk_r_em peer.
"""
