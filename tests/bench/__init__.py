"""virt-trimd benchmarks on the real rig: `PYTHONPATH=daemon:tests python3 -m bench`.

Not tests: nothing here asserts a timing. Each benchmark prints medians with their
spread next to the target from issue 6; docs/BENCHMARKS.md records a full run.
"""
