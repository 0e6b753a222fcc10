"""Code generated from protos/ by `python -m fedsqueeze.wire.protogen generate`."""
