"""The run configuration: one typed object, resolved from defaults, a TOML file and overrides.

Keys use dashes, as in the TOML file, `--set key=value` and Flower's run_config:

    name, task, partition, num-clients, cohort-size, rounds, local-steps, local-epochs, lr,
    batch-size, algorithm, mode, compressor, feedback, downlink, downlink-feedback, dense-below,
    rules, seed, randomness, round-timeout, min-replies, target-accuracy, out-dir, aggregation,
    max-update-norm, over-norm, max-examples, state-dir, sampling, local-round-cost, global-round-cost,
    checkpoint, resume, secagg

`resolve(path, overrides)` is the one entry point; anything a user can get wrong raises
`ConfigError` naming the key, the value and the valid choices, before a run starts.
`Config.to_run_config()` and `Config.from_run_config()` convert to and from Flower's flat
run_config (int/float/bool/str values), so the ServerApp and every ClientApp read the same config.

Per-tensor compression: a tensor whose name matches a rule's glob pattern (first match wins)
is compressed on its own with that rule's spec; otherwise a tensor with fewer than
`dense-below` elements is sent dense; every other tensor is compressed with `compressor`,
all of them together as one vector (one spec for the whole model is the default).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import inspect
import math
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsqueeze.specs import SpecError, parse_call, quote_bare_values

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, installed with flwr
    import tomli as tomllib

DENSE_SPEC = "identity"
NO_DOWNLINK = "none"
#: lr value asking for the stepsize of the theory (fedsqueeze.engine.plan)
THEORY_LR = "theory"
#: "delta": clients train locally and send model deltas; "gradient": one local gradient per round
MODES = ("delta", "gradient")
#: "plain": the broadcast is C(x); "ef21p": the server sends C(x - w) and both sides keep w
DOWNLINK_FEEDBACK = ("plain", "ef21p")
#: "independent": each client draws its compressor's randomness from its own seed; "shared": every client
#: of a round draws it from the round seed the server sends (fedsqueeze.engine.shared)
RANDOMNESS = ("independent", "shared")
#: the table of a run's config.toml holding values derived at start (lr = "theory" and its constants);
#: a record of the run, ignored when the file is read back as a config
RESOLVED_TABLE = "resolved"
#: partition value meaning "the task's own default" (iid, contiguous or natural)
DEFAULT_PARTITION = "default"


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names the key and the valid choices."""

    def __init__(self, key: str, value: Any, reason: str, choices: str | Iterable[str] | None = None) -> None:
        self.key = key
        self.value = value
        self.reason = reason
        if choices is not None and not isinstance(choices, str):
            choices = ", ".join(str(c) for c in choices)
        self.choices = choices
        message = f"config key {key!r} = {value!r}: {reason}"
        if choices:
            message += f" (valid: {choices})"
        super().__init__(message)


@dataclass(frozen=True)
class TensorRule:
    """Tensors whose name matches the glob `pattern` are compressed with `spec`, one tensor per payload."""

    pattern: str
    spec: str

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)

    def __str__(self) -> str:
        return f"{self.pattern}={self.spec}"


@dataclass(frozen=True)
class Config:
    """A resolved, validated run configuration (construct it with `resolve` or `Config.from_run_config`)."""

    name: str = "default"
    task: str = "digits-mlp"
    #: a partition spec (iid, dirichlet(alpha), shards(classes), contiguous, natural) or "default" (the task's)
    partition: str = "dirichlet(0.3)"
    num_clients: int = 20
    #: a count of clients (int) or a fraction of all clients (float in (0, 1])
    cohort_size: int | float = 1.0
    rounds: int = 30
    #: local SGD steps per round (ignored, and resolved to 0, when `local_epochs` > 0)
    local_steps: int = 10
    #: local epochs per round (> 0 replaces `local_steps`)
    local_epochs: float = 0.0
    #: a stepsize, or "theory" (derived from the task's smoothness and the compressor; see fedsqueeze.engine.plan)
    lr: float | str = 0.2
    #: mini-batch size; 0 uses the client's whole training split (full-batch gradient)
    batch_size: int = 32
    algorithm: str = "fedavg"
    #: "delta" (local training, model deltas) or "gradient" (one local gradient per round; algorithm fedavg)
    mode: str = "delta"
    #: uplink compressor spec for every tensor no rule or size threshold takes
    compressor: str = "identity"
    #: uplink error feedback / variance reduction: none, ef, ef21, efbv, diana (fedsqueeze.feedback)
    feedback: str = "none"
    #: broadcast compressor spec, or "none" for the exact float32 model
    downlink: str = NO_DOWNLINK
    #: what the compressed broadcast carries: "plain" C(x), or "ef21p" C(x - w) with w kept on both sides
    downlink_feedback: str = "plain"
    #: tensors with fewer elements than this are sent dense
    dense_below: int = 0
    rules: tuple[TensorRule, ...] = ()
    seed: int = 0
    #: where randomised compressors draw from: "independent" per client, or "shared" by the round's cohort
    randomness: str = "independent"
    #: seconds the server waits for the replies of a round
    round_timeout: float = 600.0
    #: fewest valid replies that make a round count; fewer skip it
    min_replies: int = 1
    #: accuracy for "bytes to reach target" in the summary; 0 disables it
    target_accuracy: float = 0.9
    out_dir: str = "runs"
    #: how the server combines the cohort's vectors: "mean" (the mechanism's own), or a robust rule:
    #: "median", "trimmed-mean(beta=0.2)", "krum(f=1, m=1)" (fedsqueeze.feedback.robust; feedback "none")
    aggregation: str = "mean"
    #: bound on the L2 norm of each decoded reply (0: none); what happens above it is `over-norm`
    max_update_norm: float = 0.0
    #: "reject" the reply, or "clip" it to the bound (clip only without feedback: a mechanism's memory
    #: must see the message as sent)
    over_norm: str = "reject"
    #: most examples a client may claim (0: its partition's size, as the server knows it)
    max_examples: int = 0
    #: in-process simulation: keep each client's state in a file under this folder between its rounds
    #: (as devices do with the node config's state-dir), not in memory; "" keeps it in memory
    state_dir: str = ""
    #: who takes part in a cohort (fedsqueeze.algorithms.sampling): "nice" (cohort-size clients uniformly,
    #: the default), "block(blocks=4)", "stratified(clusters=4, by=labels|features|gradients)",
    #: "importance(by=examples|smoothness)" (independent inclusion: cohort-size is the expected size)
    sampling: str = "nice"
    #: cost of one communication round inside a cohort (c1) and of one round between cohorts (c2): the
    #: rows' total_cost is the sum over cohorts of c1 K + c2 (K rounds per cohort; 1 for most algorithms)
    local_round_cost: float = 1.0
    global_round_cost: float = 0.0
    #: after every round, write the server's checkpoint and model.pt to the run directory (resumable);
    #: in simulation the clients' state then lives in files (state-dir, or the run directory)
    checkpoint: bool = True
    #: a run directory to continue from its last checkpoint (`fedsqueeze simulate --resume RUN_DIR`);
    #: every other key must equal the run's own
    resume: str = ""
    #: "none", or "masked(threshold=t, bits=b, clip=c)": the server learns only the cohort's sum
    #: (fedsqueeze.secagg; compressors and mechanisms whose decoding is a function of the sum)
    secagg: str = "none"

    # ---- derived values --------------------------------------------------------------------
    def cohort_count(self) -> int:
        """How many clients are sampled per round."""
        if isinstance(self.cohort_size, float):
            return max(1, math.ceil(self.cohort_size * self.num_clients - 1e-9))
        return self.cohort_size

    def task_name_and_options(self) -> tuple[str, dict[str, Any]]:
        return parse_task(self.task)

    def partition_or_none(self) -> str | None:
        """The partition spec, or None for the task's default."""
        return None if self.partition == DEFAULT_PARTITION else self.partition

    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def spec_for(self, name: str, numel: int) -> tuple[str, TensorRule | None]:
        """The uplink spec for one tensor, and the rule that chose it (None: size or default)."""
        for rule in self.rules:
            if rule.matches(name):
                return rule.spec, rule
        if numel < self.dense_below:
            return DENSE_SPEC, None
        return self.compressor, None

    def check_rules(self, names: Sequence[str]) -> None:
        """ConfigError for a rule whose pattern matches none of the model's parameter names."""
        for rule in self.rules:
            if not any(rule.matches(n) for n in names):
                raise ConfigError("rules", str(rule), "the pattern matches no parameter of the model", names)

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed (field names with underscores), validated again."""
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    # ---- validation ------------------------------------------------------------------------
    def validate(self, check_specs: bool = True) -> None:
        """Raise ConfigError for the first value that cannot be used."""
        _check_name(self.name)
        for key in ("task", "partition", "out-dir"):
            if not getattr(self, _attr(key)).strip():
                raise ConfigError(key, getattr(self, _attr(key)), "must not be empty")
        _positive_int("num-clients", self.num_clients)
        if isinstance(self.cohort_size, float):
            if not 0.0 < self.cohort_size <= 1.0:
                raise ConfigError(
                    "cohort-size", self.cohort_size, "a fraction must be in (0, 1]", "an integer count or a fraction"
                )
        else:
            _positive_int("cohort-size", self.cohort_size)
            if self.cohort_size > self.num_clients:
                raise ConfigError(
                    "cohort-size",
                    self.cohort_size,
                    f"more than num-clients = {self.num_clients}",
                    f"1..{self.num_clients} or a fraction in (0, 1]",
                )
        _positive_int("rounds", self.rounds)
        _non_negative_int("local-steps", self.local_steps)
        _finite("local-epochs", self.local_epochs, lower=0.0)
        if self.local_steps == 0 and self.local_epochs == 0:
            raise ConfigError("local-steps", 0, "no local training: local-epochs is 0 too", "an integer >= 1")
        if isinstance(self.lr, str):
            if self.lr != THEORY_LR:
                raise ConfigError("lr", self.lr, "expected a number or 'theory'", f"a number > 0, {THEORY_LR}")
        else:
            _finite("lr", self.lr, lower=0.0, strict=True)
        _non_negative_int("batch-size", self.batch_size)
        _check_algorithm(self.algorithm)
        _check_modes(self)
        _non_negative_int("dense-below", self.dense_below)
        _non_negative_int("seed", self.seed)
        if self.randomness not in RANDOMNESS:
            raise ConfigError("randomness", self.randomness, "unknown kind of randomness", RANDOMNESS)
        _finite("round-timeout", self.round_timeout, lower=0.0, strict=True)
        _positive_int("min-replies", self.min_replies)
        if self.min_replies > self.cohort_count():
            raise ConfigError(
                "min-replies",
                self.min_replies,
                f"more than the {self.cohort_count()} clients sampled per round",
                f"1..{self.cohort_count()}",
            )
        _check_defences(self)
        _check_sampling(self)
        if check_specs:
            _check_secagg(self)
        _finite("local-round-cost", self.local_round_cost, lower=0.0)
        _finite("global-round-cost", self.global_round_cost, lower=0.0)
        _finite("target-accuracy", self.target_accuracy, lower=0.0)
        if self.target_accuracy > 1.0:
            raise ConfigError("target-accuracy", self.target_accuracy, "an accuracy is at most 1", "0 (off) to 1")
        if check_specs:
            check_spec("compressor", self.compressor)
            if self.downlink != NO_DOWNLINK:
                check_spec("downlink", self.downlink, extra_choice=NO_DOWNLINK)
            for rule in self.rules:
                check_spec("rules", rule.spec, shown=str(rule))
        _check_task(self)

    # ---- Flower's run_config ---------------------------------------------------------------
    def to_run_config(self) -> dict[str, int | float | bool | str]:
        """The flat dict Flower carries as run_config (also what config.toml holds)."""
        out: dict[str, int | float | bool | str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "rules":
                value = format_rules(value)
            out[_key(f.name)] = value
        return out

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], check_specs: bool = True) -> Config:
        """The config a ServerApp or ClientApp receives (defaults fill keys Flower did not send).

        Also reads a run directory's config (its [resolved] table is a record, not configuration).
        """
        values = {k: v for k, v in run_config.items() if k != RESOLVED_TABLE}
        return resolve(overrides=values, check_specs=check_specs)

    def to_toml(self) -> str:
        """The resolved config as TOML; `resolve(path)` reads it back to an equal Config."""
        lines = []
        for key, value in self.to_run_config().items():
            lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"


# ---- resolution --------------------------------------------------------------------------------


def keys() -> list[str]:
    """Every valid configuration key, in the documented order."""
    return [_key(f.name) for f in dataclasses.fields(Config)]


def resolve(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    check_specs: bool = True,
) -> Config:
    """Defaults, then the TOML file at `path`, then `overrides` (a mapping or `key=value` strings)."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(read_toml(path))
    if overrides is not None:
        if isinstance(overrides, Mapping):
            values.update(_normalise_keys(overrides))
        else:
            values.update(parse_overrides(overrides))
    return build(values, check_specs=check_specs)


def read_toml(path: str | Path) -> dict[str, Any]:
    """The key/value pairs of a config file (top-level keys; rules may also be a list)."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("config", str(path), "file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", str(path), f"not valid TOML: {exc}") from None
    data.pop(RESOLVED_TABLE, None)
    for key, value in data.items():
        if isinstance(value, dict):
            raise ConfigError(_key(key), value, "tables are not config values; write keys at the top level", keys())
    return _normalise_keys(data)


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`key=value` strings (as given to --set) to a dict; values are read per key type later."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(item, item, "an override must look like key=value", keys())
        out.update(_normalise_keys({key.strip(): _Raw(value.strip())}))
    return out


def build(values: Mapping[str, Any], check_specs: bool = True) -> Config:
    """A validated Config from key -> value (typed values, or raw strings from the command line)."""
    known = set(keys())
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(key, _plain(value), "unknown key", keys())
        kwargs[_attr(key)] = _PARSERS[key](key, value)
    # local-epochs > 0 takes precedence: Flower's run_config always carries both keys
    if kwargs.get("local_epochs", 0.0) > 0:
        kwargs["local_steps"] = 0
    cfg = Config(**kwargs)
    cfg.validate(check_specs=check_specs)
    return cfg


# ---- the task a config names -------------------------------------------------------------


def build_task(cfg: Config) -> Any:
    """The `fedsqueeze.tasks.Task` of a config (built once per process, then shared).

    Server and clients build the same task from the same config, so every client finds its
    partition and the server its test set; a TaskError (for example a missing data file)
    becomes a ConfigError.
    """
    return _build_task_cached(cfg.task, cfg.num_clients, cfg.partition, cfg.seed)


@functools.lru_cache(maxsize=4)
def _build_task_cached(task: str, num_clients: int, partition: str, seed: int) -> Any:
    from fedsqueeze.tasks import TaskError
    from fedsqueeze.tasks import build_task as _build

    name, options = parse_task(task)
    try:
        return _build(
            name,
            num_clients=num_clients,
            partition=None if partition == DEFAULT_PARTITION else partition,
            seed=seed,
            **options,
        )
    except TaskError as exc:
        kind = partition.split("(")[0].strip()
        # the partition's messages say "partition 'name'" or quote its spec ("shards(3): ...")
        said = re.search(r"\bpartition\s+['\"]", str(exc)) or (kind and f"{kind}(" in str(exc))
        key = "partition" if said else "task"
        raise ConfigError(key, task if key == "task" else partition, str(exc)) from None


# ---- rules ---------------------------------------------------------------------------------


def format_rules(rules: Iterable[TensorRule]) -> str:
    """Rules as one string, `pattern=spec; pattern=spec` (the run_config form)."""
    return "; ".join(str(r) for r in rules)


def parse_rules(key: str, value: Any) -> tuple[TensorRule, ...]:
    """Rules from `"pat=spec; pat=spec"`, a list of such strings, or a list of {pattern, spec} tables."""
    if isinstance(value, str):
        items: list[Any] = [s for s in (part.strip() for part in value.split(";")) if s]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ConfigError(key, value, "expected a string or a list", 'rules = "fc*.weight=topk(0.01); *.bias=identity"')
    rules = []
    for item in items:
        if isinstance(item, TensorRule):
            rules.append(item)
            continue
        if isinstance(item, Mapping):
            extra = set(item) - {"pattern", "spec"}
            if extra or "pattern" not in item or "spec" not in item:
                raise ConfigError(key, dict(item), "a rule table has exactly the keys pattern and spec")
            pattern, spec = item["pattern"], item["spec"]
        elif isinstance(item, str):
            pattern, sep, spec = item.partition("=")
            if not sep:
                raise ConfigError(key, item, "a rule must look like pattern=spec", "e.g. *.bias=identity")
        else:
            raise ConfigError(key, item, "a rule is a 'pattern=spec' string or a {pattern, spec} table")
        if not isinstance(pattern, str) or not isinstance(spec, str) or not pattern.strip() or not spec.strip():
            raise ConfigError(key, item, "a rule needs a non-empty pattern and spec")
        rules.append(TensorRule(pattern.strip(), spec.strip()))
    return tuple(rules)


def check_spec(key: str, spec: str, shown: str | None = None, extra_choice: str | None = None) -> None:
    """Build the compressor once so a bad spec fails before the run starts."""
    try:
        from fedsqueeze.compressors import build as build_compressor
        from fedsqueeze.compressors.base import CompressorError
    except ImportError:  # the operator library is not installed yet: the run will fail at first use
        return
    try:
        try:
            build_compressor(spec)
        except CompressorError as exc:
            if "layout" not in str(exc):
                raise
            # operators on matrices (powersgd) need the model layout: check the arguments on a stand-in
            build_compressor(spec, layout=[(4, 4), (4,)])
    except CompressorError as exc:
        try:
            from fedsqueeze.compressors import available

            names = available()
        except ImportError:
            names = []
        if extra_choice:
            names = [extra_choice, *names]
        # the compressor library's message may already list the names
        choices = names if extra_choice or "valid" not in str(exc) else None
        raise ConfigError(key, shown or spec, str(exc), choices) from None


def parse_task(spec: str) -> tuple[str, dict[str, Any]]:
    """A task spec, `name` or `name(option=value, ...)`, to (name, options).

    The name is a built-in task ("digits-mlp") or a user's "package.module:function"; option values
    are numbers, true/false, quoted strings or bare words, e.g. `libsvm-logreg(path="a9a.txt", reg=0.1)`.
    """
    try:
        call = parse_call(spec, example='libsvm-logreg(path="data.txt")')
    except SpecError as exc:
        fixed = quote_bare_values(spec)
        if fixed is not None:
            raise ConfigError(
                "task", spec, f"{exc}; a path (or any text that is not a plain word) must be quoted: {fixed} "
                f"(in a TOML file: task = '{fixed}'; on the command line: --set 'task={fixed}')",
            ) from None  # fmt: skip
        raise ConfigError("task", spec, str(exc), _task_names()) from None
    if call.args:
        raise ConfigError("task", spec, "task options are named: name(option=value, ...)")
    return call.name, {k: tuple(v) if isinstance(v, list) else v for k, v in call.kwargs.items()}


def format_task(name: str, options: Mapping[str, Any]) -> str:
    """A task spec from its name and options (inverse of `parse_task`)."""
    if not options:
        return name

    def literal(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return repr(value)
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(literal(v) for v in value) + "]"
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

    return f"{name}(" + ", ".join(f"{k}={literal(v)}" for k, v in options.items()) + ")"


def with_data_path(cfg: Config, path: str) -> Config:
    """The config a device uses when its copy of the task's data lives at `path` (node config `data-path`).

    Replaces the `path` option of a file-backed task (libsvm-logreg, mnist-mlp, mnist-cnn, or a user's
    task taking `path`); the partition each device trains on is still chosen by its `partition-id`.
    """
    name, options = parse_task(cfg.task)
    valid: Mapping[str, Any] | None = None
    if ":" not in name:
        from fedsqueeze.tasks import task_options

        valid = task_options(name)
    if (valid is not None and "path" not in valid) or (valid is None and "path" not in options):
        raise ConfigError("data-path", path, f"task {name!r} reads no data files, so a node's data-path has no use")
    return dataclasses.replace(cfg, task=format_task(name, {**options, "path": str(path)}))


def _algorithm_names() -> list[str]:
    from fedsqueeze.algorithms import available

    return available()


def _check_algorithm(spec: str) -> None:
    """ConfigError unless `fedsqueeze.algorithms.build(spec)` accepts the spec ("fedprox(mu=0.01)")."""
    from fedsqueeze.algorithms import build

    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("algorithm", spec, "empty algorithm", _algorithm_names())
    try:
        build(spec)
    except (ValueError, TypeError) as exc:
        raise ConfigError("algorithm", spec, str(exc), _algorithm_names()) from None


def _check_modes(cfg: Config) -> None:
    """mode, feedback and downlink-feedback, and what they need of the algorithm."""
    if cfg.mode not in MODES:
        raise ConfigError("mode", cfg.mode, "unknown mode", MODES)
    if cfg.downlink_feedback not in DOWNLINK_FEEDBACK:
        raise ConfigError("downlink-feedback", cfg.downlink_feedback, "unknown downlink feedback", DOWNLINK_FEEDBACK)
    from fedsqueeze import feedback
    from fedsqueeze.algorithms import build

    try:
        feedback.parse_spec(cfg.feedback)
    except feedback.FeedbackError as exc:
        raise ConfigError("feedback", cfg.feedback, str(exc), feedback.available()) from None
    if cfg.mode == "gradient" and cfg.algorithm != "fedavg":
        raise ConfigError(
            "mode", cfg.mode, f"gradient mode sends one local gradient per round; algorithm {cfg.algorithm!r} "
            "communicates its own quantity (use mode = \"delta\" with it, or algorithm = \"fedavg\")",
            MODES,
        )  # fmt: skip
    if cfg.feedback != "none" and build(cfg.algorithm).reports_weights:
        raise ConfigError(
            "feedback", cfg.feedback, f"algorithm {cfg.algorithm!r} weighs clients by values they report each "
            "round, while feedback mechanisms keep running means over fixed client shares", ["none"],
        )  # fmt: skip


OVER_NORM = ("reject", "clip")


def _check_defences(cfg: Config) -> None:
    """The hostile-client defences: norm bound and action, example cap, robust aggregation."""
    from fedsqueeze.algorithms import build as build_algorithm
    from fedsqueeze.feedback import FeedbackError
    from fedsqueeze.feedback.robust import RULES, check_rule_fits

    _finite("max-update-norm", cfg.max_update_norm, lower=0.0)
    if cfg.over_norm not in OVER_NORM:
        raise ConfigError("over-norm", cfg.over_norm, "unknown action", OVER_NORM)
    stateful = cfg.feedback != "none"
    if cfg.over_norm == "clip" and cfg.max_update_norm > 0 and stateful:
        raise ConfigError(
            "over-norm", cfg.over_norm, f"feedback {cfg.feedback!r} keeps client and server memory of every "
            "message as sent: a clipped message would part them; rejected replies are not acknowledged", ["reject"],
        )  # fmt: skip
    _non_negative_int("max-examples", cfg.max_examples)
    try:
        check_rule_fits(cfg.aggregation, "none" if not stateful else cfg.feedback)
    except FeedbackError as exc:
        raise ConfigError("aggregation", cfg.aggregation, str(exc), list(RULES)) from None
    if cfg.aggregation != "mean" and build_algorithm(cfg.algorithm).reports_weights:
        raise ConfigError(
            "aggregation", cfg.aggregation, f"algorithm {cfg.algorithm!r} weighs clients by values they report "
            "each round, which a robust rule would ignore", ["mean"],
        )  # fmt: skip


def _check_sampling(cfg: Config) -> None:
    """The sampling spec, and what a sampling or a cohort algorithm needs of the feedback mechanism.

    A sampling with unequal p_i weighs each reply by s_i / p_i in the cohort mean: only server halves
    that form the mean of the round's messages alone take per-reply weights (feedback none, ef; the
    "mean" aggregation), and algorithms that report their own weights would override them. A cohort
    algorithm (sppm) needs the estimate of its cohort's objective f_S, which the running means of
    ef21, efbv and diana (they mix in the memories of clients outside the cohort) are not.
    """
    from fedsqueeze import feedback
    from fedsqueeze.algorithms import build as build_algorithm
    from fedsqueeze.algorithms.sampling import DEFAULT_SAMPLING, SAMPLINGS, SamplingError, parse_sampling

    try:
        name, _ = parse_sampling(cfg.sampling, cfg.num_clients)
    except SamplingError as exc:
        raise ConfigError("sampling", cfg.sampling, str(exc), list(SAMPLINGS)) from None
    algorithm = build_algorithm(cfg.algorithm)
    cohort_mean = feedback.mechanism(feedback.parse_spec(cfg.feedback)[0]).cohort_mean
    if name != DEFAULT_SAMPLING:
        if not cohort_mean:
            raise ConfigError(
                "feedback", cfg.feedback, f"sampling {cfg.sampling!r} weighs each reply by s_i / p_i, and "
                f"{cfg.feedback!r} keeps running means over fixed client shares that take no per-reply weights",
                ["none", "ef"],
            )  # fmt: skip
        if cfg.aggregation != "mean":
            raise ConfigError(
                "aggregation", cfg.aggregation, f"sampling {cfg.sampling!r} weighs each reply by s_i / p_i, "
                "which a robust rule would ignore", ["mean"],
            )  # fmt: skip
        if algorithm.reports_weights:
            raise ConfigError(
                "sampling", cfg.sampling, f"algorithm {cfg.algorithm!r} weighs clients by values they report, "
                "which would override the sampling's 1 / p_i weights", [DEFAULT_SAMPLING],
            )  # fmt: skip
    if algorithm.cohort_objective and not cohort_mean:
        raise ConfigError(
            "feedback", cfg.feedback, f"algorithm {cfg.algorithm!r} solves its cohort's subproblem from the "
            f"cohort's own messages; {cfg.feedback!r} estimates the mean over every client's memory instead",
            ["none", "ef"],
        )  # fmt: skip


def _check_secagg(cfg: Config) -> None:
    """The secagg value, and that every part of the run decodes from the cohort's sum (fedsqueeze.secagg.spec)."""
    from fedsqueeze.algorithms import build as build_algorithm
    from fedsqueeze.secagg.spec import EXAMPLE, NONE, SecAggSpecError, check_compressor, parse

    try:
        secagg = parse(cfg.secagg)
    except SecAggSpecError as exc:
        raise ConfigError("secagg", cfg.secagg, str(exc), [NONE, EXAMPLE]) from None
    if secagg is None:
        return
    n = cfg.cohort_count()
    if not n / 2 < secagg.threshold <= n:
        raise ConfigError(
            "secagg", cfg.secagg, f"the threshold must be above half the cohort of {n} clients and at most {n}, so "
            "that no two disjoint groups of clients can each unmask a client", f"threshold in {n // 2 + 1}..{n}",
        )  # fmt: skip
    shared = cfg.randomness == RANDOMNESS[1]
    for key, spec in [("compressor", cfg.compressor), *(("rules", r.spec) for r in cfg.rules)]:
        try:
            check_compressor(spec, shared)
        except SecAggSpecError as exc:
            raise ConfigError(key, spec, f"with secagg: {exc}") from None
    if cfg.feedback != "none":
        raise ConfigError(
            "feedback", cfg.feedback, "with secagg the server sees only the cohort's sum of rounded messages, and "
            "a feedback mechanism's client memory must follow each message as the server decodes it", ["none"],
        )  # fmt: skip
    if cfg.aggregation != "mean":
        raise ConfigError("aggregation", cfg.aggregation, "a robust rule needs each client's vector, which secagg "
                          "hides: only the sum is revealed", ["mean"])  # fmt: skip
    if cfg.max_update_norm > 0:
        raise ConfigError("max-update-norm", cfg.max_update_norm, "with secagg the server cannot see a reply's "
                          "norm; the secagg clip bounds every coordinate instead", ["0"])  # fmt: skip
    if build_algorithm(cfg.algorithm).reports_weights:
        raise ConfigError("algorithm", cfg.algorithm, "it weighs clients by values they report each round, which "
                          "secagg would have to reveal per client", ["fedavg"])  # fmt: skip


def _task_names() -> list[str]:
    try:
        from fedsqueeze.tasks import available_tasks
    except ImportError:
        return []
    return [*available_tasks(), "package.module:function"]


def _check_task(cfg: Config) -> None:
    """Reject unknown task names, task options and partitions without building the task."""
    name, options = parse_task(cfg.task)
    try:
        from fedsqueeze.tasks import TaskError, parse_partition, task_options
    except ImportError:  # the task library is not installed yet: the run will fail at first use
        return
    if ":" not in name:
        try:
            valid = task_options(name)
        except TaskError as exc:
            raise ConfigError("task", cfg.task, str(exc)) from None  # the message lists the tasks
        for key in options:
            if key.replace("-", "_") not in valid:
                raise ConfigError("task", cfg.task, f"{name} has no option {key!r}", list(valid) or ["none"])
        missing = [k for k, v in valid.items() if v is inspect.Parameter.empty and k not in options]
        if missing:
            raise ConfigError("task", cfg.task, f"{name} needs the option {missing[0]!r}", list(valid))
    if cfg.partition != DEFAULT_PARTITION:
        try:
            parse_partition(cfg.partition)
        except TaskError as exc:
            from fedsqueeze.tasks import PARTITIONS

            raise ConfigError("partition", cfg.partition, str(exc), [*PARTITIONS, DEFAULT_PARTITION]) from None


# ---- value parsers -----------------------------------------------------------------------------


class _Raw(str):
    """A value typed on the command line: parsed according to the key's type."""


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, _Raw) else value


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def _parse_str(key: str, value: Any) -> str:
    if isinstance(value, _Raw):
        return _unquote(str(value))
    if not isinstance(value, str):
        raise ConfigError(key, value, f"expected a string, got {type(value).__name__}")
    return value


def _parse_int(key: str, value: Any) -> int:
    if isinstance(value, _Raw):
        try:
            return int(_unquote(value))
        except ValueError:
            raise ConfigError(key, str(value), "expected an integer") from None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(key, value, f"expected an integer, got {type(value).__name__}")
    return value


def _parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, _Raw):
        text = _unquote(value).strip().lower()
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no"):
            return False
        raise ConfigError(key, str(value), "expected true or false", ["true", "false"])
    if not isinstance(value, bool):
        raise ConfigError(key, value, f"expected true or false, got {type(value).__name__}", ["true", "false"])
    return value


def _parse_float(key: str, value: Any) -> float:
    if isinstance(value, _Raw):
        try:
            return float(_unquote(value))
        except ValueError:
            raise ConfigError(key, str(value), "expected a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, value, f"expected a number, got {type(value).__name__}")
    return float(value)


def _parse_lr(key: str, value: Any) -> float | str:
    """A number, or "theory"."""
    if isinstance(value, str) and _unquote(str(value)).strip().lower() == THEORY_LR:
        return THEORY_LR
    try:
        if isinstance(value, str) and not isinstance(value, _Raw):
            raise ConfigError(key, value, "not a number")
        return _parse_float(key, value)
    except ConfigError:
        raise ConfigError(key, _plain(value), "expected a number or 'theory'", f"a number > 0, {THEORY_LR}") from None


def _parse_count_or_fraction(key: str, value: Any) -> int | float:
    """An int is a count, a float a fraction ("10" -> 10 clients, "0.5" or "1.0" -> a fraction)."""
    if isinstance(value, _Raw):
        text = _unquote(value)
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            raise ConfigError(key, str(value), "expected a count or a fraction", "e.g. 10 or 0.5") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, value, f"expected a count or a fraction, got {type(value).__name__}", "e.g. 10 or 0.5")
    return value


def _parse_spec_or_none(key: str, value: Any) -> str:
    text = _parse_str(key, value).strip()
    return NO_DOWNLINK if text.lower() in ("", "none", "dense") else text


_PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "name": _parse_str,
    "task": _parse_str,
    "partition": _parse_str,
    "num-clients": _parse_int,
    "cohort-size": _parse_count_or_fraction,
    "rounds": _parse_int,
    "local-steps": _parse_int,
    "local-epochs": _parse_float,
    "lr": _parse_lr,
    "batch-size": _parse_int,
    "algorithm": _parse_str,
    "mode": lambda k, v: _parse_str(k, v).strip(),
    "compressor": lambda k, v: _parse_str(k, v).strip(),
    "feedback": lambda k, v: _parse_str(k, v).strip(),
    "downlink": _parse_spec_or_none,
    "downlink-feedback": lambda k, v: _parse_str(k, v).strip(),
    "dense-below": _parse_int,
    "rules": lambda k, v: parse_rules(k, _unquote(v) if isinstance(v, _Raw) else v),
    "seed": _parse_int,
    "randomness": lambda k, v: _parse_str(k, v).strip(),
    "round-timeout": _parse_float,
    "min-replies": _parse_int,
    "target-accuracy": _parse_float,
    "out-dir": _parse_str,
    "state-dir": lambda k, v: _parse_str(k, v).strip(),
    "aggregation": lambda k, v: _parse_str(k, v).strip(),
    "max-update-norm": _parse_float,
    "over-norm": lambda k, v: _parse_str(k, v).strip(),
    "max-examples": _parse_int,
    "sampling": lambda k, v: _parse_str(k, v).strip(),
    "local-round-cost": _parse_float,
    "global-round-cost": _parse_float,
    "checkpoint": _parse_bool,
    "resume": lambda k, v: _parse_str(k, v).strip(),
    "secagg": lambda k, v: _parse_str(k, v).strip(),
}


def _positive_int(key: str, value: int) -> None:
    if value < 1:
        raise ConfigError(key, value, "must be at least 1", "an integer >= 1")


def _non_negative_int(key: str, value: int) -> None:
    if value < 0:
        raise ConfigError(key, value, "must not be negative", "an integer >= 0")


def _finite(key: str, value: float, lower: float, strict: bool = False) -> None:
    if not math.isfinite(value) or value < lower or (strict and value == lower):
        bound = f"> {lower:g}" if strict else f">= {lower:g}"
        raise ConfigError(key, value, f"must be a finite number {bound}", f"a number {bound}")


def _check_name(name: str) -> None:
    from fedsqueeze.tracking.rundir import RUN_NAME_RULE, valid_run_name

    if not valid_run_name(name):
        raise ConfigError("name", name, f"a run name is one directory name that {RUN_NAME_RULE}")


def _key(attr: str) -> str:
    return attr.replace("_", "-")


def _attr(key: str) -> str:
    return key.replace("-", "_")


def _normalise_keys(values: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k).strip().replace("_", "-"): v for k, v in values.items()}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int):
        return str(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


# Defaults of the dataclass, as run_config values (pyproject's [tool.flwr.app.config] holds these).
DEFAULTS = Config().to_run_config()
