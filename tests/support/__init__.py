"""What the tests share, imported by package name (``from tests.support.serverproc import ...``):

- ``serverproc``: ``lossd serve`` as a real subprocess (also the benchmark's process control);
- ``golden``: the values recorded from the upstream packages (tests/golden/README.md);
- ``losskit``: a spec's example call, calling a loss as the server does, leaves and gradients,
  the golden runner;
- ``opskit``: throwaway certificates and token files, in-process servers with settings,
  Prometheus parsing, the evaluation ``Gate``;
- ``wirekit``: every dtype the wire carries, a bare in-process server of a servicer;
- ``auditkit``, ``pgserver``: the audit tests' storage backends;
- ``budget``: the reliability suite's hypothesis profiles.
"""
