"""The pieces of `scripts/bench`: processes, references, figures, report and chart.

The package lives next to the script and is imported with `scripts/` on `sys.path`
(the script does that itself; the smoke test does the same).
"""
