"""Test support shipped with the package.

``autotune.testing.replay``: a replayed landscape, target and load driver that run the whole study
loop without Envoy or Locust. ``autotune.testing.conformance``: the target conformance suite
(``TargetConformance``, ``TargetFactory``); it imports pytest, so it is imported by name.
"""
