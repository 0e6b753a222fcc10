"""The message schema of a round and the protocol constants both halves share.

    query   server -> client: {}                    client -> server: "info" {partition-id, num-examples,
                                                                              num-partitions (if set)}
    train   server -> client: "broadcast" payloads  client -> server: "update" payloads
                              "config" {server-round, "metrics" {num-examples, train-loss,
                              feedback-ack, downlink-step,           compression-error, partition-id,
                              downlink-resync, run-uid,              server-round, ...}
                              round-seed, algorithm keys}

Payloads are `{group key: bytes}` (one `fedsqueeze.wire` message per group of the payload plan);
the Flower apps carry each as `Array(dtype="uint8", shape=(n,), stype=STYPE, data=bytes)`.

The protocol's state machine (both ends of it are in `fedsqueeze.engine.server` and `.client`):
- feedback acknowledgement: a client keeps the memory update of the reply it sent as *pending* and
  commits it only when the next message names that reply's round in FEEDBACK_ACK (the server took it
  in); otherwise it drops it, so lost or late replies leave both sides' memory in agreement;
- ef21p downlink: each broadcast carries DOWNLINK_STEP; a client whose copy of w is not at the
  previous step gets w itself with DOWNLINK_RESYNC set.
"""

from __future__ import annotations

STYPE = "fedsqueeze/v1"

# ---- message types and record names
QUERY, TRAIN = "query", "train"
INFO, BROADCAST, CONFIG, UPDATE, METRICS = "info", "broadcast", "config", "update", "metrics"

# ---- config keys the server sets (the algorithm's own per-client keys travel beside them)
SERVER_ROUND = "server-round"
#: the last round whose reply from this client the server's feedback half took in
FEEDBACK_ACK = "feedback-ack"
#: the ef21p downlink step this broadcast brings the client's w to
DOWNLINK_STEP = "downlink-step"
#: True: the broadcast is w itself, exact (the client's copy was stale)
DOWNLINK_RESYNC = "downlink-resync"
#: the run's identity (hex), which a resumed run keeps: clients key their state files by it
RUN_UID = "run-uid"
#: the round's shared seed (randomness = "shared"; fedsqueeze.engine.shared), the same for the whole cohort
ROUND_SEED = "round-seed"
SERVER_KEYS = (SERVER_ROUND, FEEDBACK_ACK, DOWNLINK_STEP, DOWNLINK_RESYNC, RUN_UID, ROUND_SEED)

# ---- metric keys a client reports
PARTITION_ID = "partition-id"
#: in the query's answer: the node config's num-partitions, when it has one (num-clients follows it)
NUM_PARTITIONS = "num-partitions"
#: the run config key that follows it
NUM_CLIENTS = "num-clients"
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
COMPRESSION_ERROR = "compression-error"
#: the reply's metrics also carry SERVER_ROUND: the round of the message it answers
REPORTED = (PARTITION_ID, NUM_EXAMPLES, TRAIN_LOSS, COMPRESSION_ERROR, SERVER_ROUND)

# ---- client state keys of the protocol (beside the algorithm's and the mechanism's own)
#: the memory update that waits for the server's acknowledgement
PENDING = "pending."
PENDING_ROUND = PENDING + "round"
#: the pending update as the payload bytes it is a function of (see Mechanism.replay), and whether
#: that payload was the client's first, uncompressed message
PENDING_PAYLOAD = PENDING + "payload."
PENDING_INITIAL = PENDING + "initial"
