"""Secure aggregation of compressed updates: the server learns only the sum of a round's updates.

`masking` (X25519, HKDF, ChaCha20 masks in Z_{2^w}), `shamir` (secret sharing over a prime field),
`quantize` (b-bit stochastic rounding on a common scale), `session` (the four stages, both ends),
`spec` (the `secagg` config value and which compressors and mechanisms qualify). Nothing here
imports Flower or the round engine; `fedsqueeze.engine.secure` runs the stages through a transport.
"""
