"""The wire: what the client and the server both import to speak ``lossd.v1``.

- ``limits``: decode limits and the codec's errors (torch-free: settings import them);
- ``codec``: tensors and values to and from messages, validated before any allocation;
- ``framing``: hand-framed chunk messages, tags and method names from the proto descriptors
  (torch-free);
- ``assembler``: chunked tensor bytes into one preallocated buffer;
- ``audit``: the tensor digest and the bounds of run ids and tags;
- ``layout``: where tensor bytes lie in a serialized message (prepared requests and plans).

Nothing here imports the server, and importing this package imports nothing: each module pulls
in only what it needs (torch for ``codec``, ``assembler`` and ``audit``).
"""
