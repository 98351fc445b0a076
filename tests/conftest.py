"""Test-wide settings."""

from hypothesis import settings

# Property tests explore the same examples on every run (a red CI must point at a change, not at
# the draw), and machines shared with other jobs get no per-example deadline.
settings.register_profile("ec_hooks", derandomize=True, deadline=None)
settings.load_profile("ec_hooks")
