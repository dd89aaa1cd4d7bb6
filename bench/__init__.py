"""lossd benchmark harness: ``python -m bench [--quick] [--device cuda]``.

Measures, in one run and on the same payloads, the transport floor (a bare gRPC unary echo and a
bare bidi ping-pong served by ``bench.floor``), local torch forward+backward, and lossd remote
forward+backward through ``RemoteLoss``; then throughput with concurrent client processes and the
server's memory. Results go to ``bench/results/*.json`` and ``bench/RESULTS.md``.
"""
