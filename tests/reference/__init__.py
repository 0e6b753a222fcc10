"""Independent float64 references of the algorithms, the oracles the round engine is checked against.

They call the same algorithm and mechanism halves but none of `fedsqueeze.engine`: full participation
(or a seeded uniform cohort) in float64, no Flower, no wire except where a payload's size is counted.
`algorithms.run` drives the local-training algorithms; `gradient_mode.run_gradient_mode` gradient mode
with feedback and a compressed downlink.
"""
