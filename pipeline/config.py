"""One typed job config, validated once: YAML file + `section.key=value` CLI overrides, embedded defaults.

YAML is read with `yaml.safe_load`, so a config file cannot construct Python objects or run code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.audit.thresholds import Thresholds
from pipeline.paths import shipped_path
from pipeline.storage import redact_userinfo


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Upper bounds: far above any real job, low enough that a typo (an extra zero or three) is refused at load instead
# of asking the cluster for 100,000 actors or the black box for million-pixel inputs.
MAX_ACTORS = 4096
MAX_BATCH = 65_536
MAX_IMAGE_SIDE = 4096
MAX_SECONDS = 3600.0  # one request, one timeout: an hour is already no timeout at all
MAX_CPUS = 1024.0
MAX_BUDGET = 10**12
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")


def _env_name(value: str) -> str:
    if not _ENV_NAME.fullmatch(value):  # the value is never echoed: it may be the secret itself, pasted
        raise ValueError("must be the name of an environment variable (letters, digits, _), not its value")
    return value


EnvName = Annotated[str, AfterValidator(_env_name)]


class SourceConfig(_Section):
    uri: str = "out/demo/shards"
    format: Literal["parquet", "webdataset", "imagefolder"] = "parquet"
    image_column: str = "image"
    key_column: str | None = "key"  # null: file:row keys
    label_column: str | None = "label"  # null: the source has no labels
    endpoint_url: str | None = None  # S3-compatible store; else env S3_ENDPOINT_URL / AWS chain
    # A stable sample: the rows whose key hashes below the fraction, the same ones every run and in every shard (a
    # grown source adds its new rows at the same rate); another seed draws another sample.
    sample_fraction: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    sample_seed: int = Field(default=0, ge=0, le=2**63 - 1)
    # At most this many rows (after the sample); which ones depends on the order reads finish in. With resume it
    # counts rows not done yet: each rerun takes up to this many more (a large source in installments).
    limit: int | None = Field(default=None, ge=1, le=10**12)
    decode_policy: Literal["resize", "pad", "reject"] = "resize"
    max_image_bytes: int = Field(default=20_000_000, ge=1, le=1 << 30)


class ModelConfig(_Section):
    name: str = "fmnist-tiny"  # preset name, local save_pretrained folder, or hub id
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda|cuda:\d{1,3})$")  # cuda:N in-process only (eval)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


class PurifyConfig(_Section):
    method: Literal["none", "sdedit", "zip", "sampdetox", "repair", "guided", "cascade"] = "cascade"
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    # Method-specific knobs, passed to the purifier's constructor and validated there (see pipeline/purify/).
    params: dict[str, Any] = Field(default_factory=dict)


class BlackBoxConfig(_Section):
    uri: str = "onnx:models/victims/badnets.onnx"
    size: int = Field(default=28, ge=1, le=MAX_IMAGE_SIDE)
    channels: Literal[1, 3] = 1
    scale: Literal["unit", "signed", "uint8"] = "unit"
    input_name: str = "input-0"
    datatype: str = "FP32"
    max_batch_size: int = Field(default=256, ge=1, le=MAX_BATCH)
    max_concurrency: int = Field(default=4, ge=1, le=256)
    timeout_s: float = Field(default=30.0, gt=0, le=MAX_SECONDS, allow_inf_nan=False)
    retries: int = Field(default=4, ge=0, le=20)
    # None: no limit. Zero is refused rather than read as "no limit": it looks like "send nothing".
    rate_limit_qps: float | None = Field(default=None, gt=0, le=1e6, allow_inf_nan=False)
    query_budget: int | None = Field(default=None, ge=0, le=MAX_BUDGET)
    # Names of env vars (never the secrets themselves: a pasted token fails the name check, which never echoes it):
    # the bearer token's, and header -> the var holding its value.
    auth_env: EnvName | None = None
    header_env: dict[str, EnvName] = Field(default_factory=dict)
    class_names: list[str] | None = Field(default=None, max_length=100_001)  # for reports; index = label


class ResourcesConfig(_Section):
    # The purify pool: one diffusion model per actor (and per GPU), whatever the method; a vote runs inside it.
    purify_actors: int = Field(default=1, ge=1, le=MAX_ACTORS)  # initial/min size: must fit, or preflight fails
    # autoscaling upper bound (default = purify_actors)
    max_purify_actors: int | None = Field(default=None, ge=1, le=MAX_ACTORS)
    # None: 1 when the cluster has GPUs, else 0. At most 1: one diffusion model never needs more than one GPU, and
    # Ray takes fractions only below 1; a fraction packs that many purifiers onto a GPU (0.5: two).
    gpus_per_actor: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    purify_batch_size: int = Field(default=64, ge=1, le=MAX_BATCH)
    # The black-box service: actors that own the client, shared by every purifier. The query budget, rate limit
    # and concurrency of `blackbox` are totals over all of them.
    query_actors: int = Field(default=1, ge=1, le=MAX_ACTORS)
    query_batch_size: int = Field(default=256, ge=1, le=MAX_BATCH)
    decode_batch_size: int = Field(default=256, ge=1, le=MAX_BATCH)
    # Logical CPUs per actor/task. Zero by default for CPU purifiers: Ray Data's own listing, reading and
    # checkpoint-filter operators take 1 CPU each, and on a 2-CPU machine any more for ours deadlocks the plan.
    # CPU purification still uses the cores (torch_threads); on GPU nodes the GPU is what gets reserved.
    purify_cpus: float | None = Field(default=None, ge=0, le=MAX_CPUS, allow_inf_nan=False)  # None: 1 with a GPU
    # Zero by default, like the CPU purifiers (see above); with zero, the service is placed on the node with the
    # most CPUs, never on a head started with 0 CPUs to keep work off it.
    query_cpus: float = Field(default=0.0, ge=0, le=MAX_CPUS, allow_inf_nan=False)
    decode_cpus: float = Field(default=0.25, gt=0, le=MAX_CPUS, allow_inf_nan=False)
    # How long preflight waits for an autoscaler to add the nodes a plan needs; 0: fail at once (no autoscaler).
    wait_for_nodes_s: float = Field(default=0.0, ge=0, le=3600, allow_inf_nan=False)
    # Blocks of at most this size stream through the plan: the unit of progress, of resume and of output files.
    # Ray's default (128 MiB) would hold ~80k small images in one block, written only when the block is done.
    max_block_kib: int = Field(default=4096, ge=16, le=1 << 20)
    # CPU purification threads; None: this purifier's share of the cores it can run on (affinity, capped by a
    # container CPU limit), divided among the live CPU purifiers on the machine before every model call
    # (pipeline.cores): OpenMP threads oversubscribed slow every process down many times over.
    torch_threads: int | None = Field(default=None, ge=1, le=4096)

    @model_validator(mode="after")
    def _pool_bounds(self) -> ResourcesConfig:
        # Caught here, not by Ray's actor pool, which would refuse only after the gate's calibration rows were billed.
        if self.max_purify_actors is not None and self.max_purify_actors < self.purify_actors:
            raise ValueError(f"max_purify_actors ({self.max_purify_actors}) must be at least purify_actors "
                             f"({self.purify_actors}), the pool's initial and minimum size")
        return self


class OutputConfig(_Section):
    uri: str = "out/demo/sanitized"
    endpoint_url: str | None = None
    keep_original: bool = False  # also store the input image (audits need it for before/after grids)
    resume: bool = True  # Ray Data checkpointing on the reader's id column


class SinkCheckConfig(_Section):
    """The job-end check for a black box that answers the purification itself (pipeline/flows.py); on by default,
    since the labels of a job that fails it are the attacker's."""

    enabled: bool = True
    absorb_rate: float = Field(default=0.03, gt=0, lt=1, allow_inf_nan=False)
    class_share: float = Field(default=0.5, gt=0, le=1, allow_inf_nan=False)
    min_class_rows: int = Field(default=20, ge=1, le=10**9)

    @property
    def settings(self) -> dict[str, Any]:
        """The keyword arguments of `pipeline.flows.find_sinks` / `sinks_in_table`."""
        return self.model_dump(exclude={"enabled"})


class AuditConfig(_Section):
    # where report.json/html go besides the local --report folder (default: <output.uri>/_report for a remote output)
    report_uri: str | None = None
    previous: str | None = None  # an earlier report.json (local or s3://) for the trend
    # also write report.json here, to be the next run's `previous`; not on a run that raised an alert
    publish_latest: str | None = None
    thresholds: Thresholds = Field(default_factory=Thresholds)  # known keys and ranges: pipeline/audit/thresholds.py
    # About N images, drawn as source.sample_fraction = N / the source's rows (Parquet, image folders: counted up
    # front): the same rows on every run while the source is unchanged (see audit.run.draw_sample for a growing
    # one); a WebDataset source, which cannot be counted, needs the fraction. With a fraction, N caps it by
    # narrowing the hash range where the rows can be counted.
    sample: int | None = Field(default=None, ge=1, le=10**9)


class JobConfig(_Section):
    source: SourceConfig = Field(default_factory=SourceConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    purify: PurifyConfig = Field(default_factory=PurifyConfig)
    blackbox: BlackBoxConfig = Field(default_factory=BlackBoxConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    sink_check: SinkCheckConfig = Field(default_factory=SinkCheckConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    ray_address: str | None = None  # None: connect to RAY_ADDRESS if set, else start a local cluster

    @field_validator("ray_address")
    @classmethod
    def _strip(cls, v: str | None) -> str | None:
        return v.strip() or None if isinstance(v, str) else v

    @model_validator(mode="after")
    def _service_fits_its_limits(self) -> JobConfig:
        # The service splits blackbox.max_concurrency over its actors: each needs at least one request in flight.
        if not self.blackbox.uri.startswith("onnx:") and self.resources.query_actors > self.blackbox.max_concurrency:
            raise ValueError(f"resources.query_actors ({self.resources.query_actors}) must be at most "
                             f"blackbox.max_concurrency ({self.blackbox.max_concurrency}), the job's total of "
                             "requests in flight")
        return self


def _set_dotted(tree: dict, dotted: str, raw: str) -> None:
    *path, leaf = dotted.split(".")
    node = tree
    for part in path:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {part!r} is not a section")
    try:
        node[leaf] = yaml.safe_load(raw)  # typed like YAML: 3 -> int, true -> bool, [a, b] -> list
    except yaml.YAMLError as e:
        raise ValueError(f"override {dotted!r}: its value is not valid YAML ({_yaml_problem(e)})") from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    # The problem and its position only: the full message quotes the offending text, which may hold a secret.
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or type(e).__name__}{where}"


# A path such as 2024 or 2024-05-01 reads as a number or a date in YAML (and so in a.b=value overrides).
_QUOTE_IT = " (YAML reads 2024, 2024-05-01 or true as a number, a date or a bool: quote it, e.g. a.b='2024')"


def _validate(tree: dict) -> JobConfig:
    """Validate once; the errors name each field and why, never the value given (a URI may carry credentials)."""
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
                             + (_QUOTE_IT if err["type"] == "string_type" else "")
                             for err in e.errors(include_input=False, include_url=False))
        raise ValueError(redact_userinfo(f"invalid config: {problems}")) from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Read a YAML job file (optional), apply `a.b=value` overrides, validate once."""
    tree: dict = {}
    if path is not None:
        p = shipped_path(path)
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({_yaml_problem(e)})") from None
        if not isinstance(tree, dict):
            raise ValueError(f"{path}: a job config must be a YAML mapping")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), raw)
    return _validate(tree)
