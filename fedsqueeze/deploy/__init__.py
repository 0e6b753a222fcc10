"""Deployment on Flower's deployment engine: credentials, durable client state, process helpers.

- `credentials`: the CA, the SuperLink's TLS certificate and SuperNode key pairs (`fedsqueeze keys`).
- `state`: a client's persistent tensors on disk (`state-dir` in the SuperNode's node config).
- `processes`: start and stop a SuperLink and SuperNodes on loopback (tests and scripts).

This package imports no `flwr` at import time: the credentials and state store are plain Python.
"""
