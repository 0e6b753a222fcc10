"""The calibration message both halves use (`fedsqueeze.server.calibration`, `fedsqueeze.client.app`).

query.calibrate  server -> client: ArrayRecord "model"   (the global model's state_dict, float32)
                                   ConfigRecord "calibrate" {layers: "a,b", outputs: bool,
                                                              max-examples: int (0 = all)}
                 client -> server: ArrayRecord "stats"   (`Stats.to_arrays`: float64 sums, int64 counts)
                                   MetricRecord "info"   {partition-id, num-examples}
"""

MESSAGE_TYPE = "query.calibrate"
#: the ClientApp action name (`@app.query(ACTION)`)
ACTION = "calibrate"
MODEL = "model"
CONFIG = "calibrate"
STATS = "stats"
INFO = "info"
LAYERS = "layers"
OUTPUTS = "outputs"
MAX_EXAMPLES = "max-examples"
