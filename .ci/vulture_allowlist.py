"""False positives of the dead-code check (``vulture``, run by .ci/run; settings in
pyproject.toml). Each name here is used, but by a framework or a caller vulture cannot see.
Never executed; a name listed counts as used."""

# PEP 562 module attributes (client/__init__.py's lazy exports)
__getattr__
__dir__

# torch.autograd.Function and nn.Module hooks, and the tensors a Function's forward takes only
# so that autograd sees them (client/functional.py)
setup_context
extra_repr
diff_tensors

# prometheus_client's Collector protocol (server/metrics.py): the registry calls them
collect
describe

# socketserver class attributes read by the standard library (the metrics HTTP server)
address_family

# Public result fields: read by callers (crit.last_result), not by lossd itself
timings_ns

# A callback's signature: malloc_trim(pad) stood in by a test double (tests/ops/test_memory.py)
pad

# Protobuf message fields set on a response (the reader is the peer)
error_message
