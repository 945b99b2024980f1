"""task=benchmark: lm-eval task suites on an export through the ldm adapter.

    python run.py task=benchmark checkpoint=outputs/models/<run> benchmark=offline \
        [dataset=shakespeare benchmark.max_items=100 ...]

The export brings its model and context (and, unless dataset= is given, the data set it was
trained on). Offline suites (cloze, choice, synthetic) are built from the prepared test split of
that data set (found by name, as task=evaluate finds it) into <run dir>/tasks/, in lm-eval's
custom-task
format; hub suites (bert_chat, llada_base) use the harness's own tasks. The harness's results go
to <run dir>/results.json, its per-item samples to <run dir>/samples_<task>.jsonl, and every
task's metrics (`<task>.<metric>`), with seconds per item, NFE and tokens/s, to mlflow.
Everything is checked before the model loads or the mlflow run starts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List

from omegaconf import DictConfig, OmegaConf

from ldm.errors import ConfigError, DataError

log = logging.getLogger("ldm")

DEVICES = ("auto", "cpu", "cuda")
RESULTS = "results.json"
OFFLINE_SUITES = "benchmark=offline (cloze, choice) or benchmark=synthetic"


def validate(cfg: DictConfig) -> Dict[str, Any]:
    """Check the suite, the estimator and the sampler settings; return the sampler overrides."""
    from ldm.harness.elbo import check_estimator_args
    from ldm.harness.generation import SAMPLER_FIELDS, sampler_settings
    from ldm.harness.suites import check_task_names

    b = cfg.benchmark
    tasks = check_task_names(list(b.tasks), b.hub)
    check_estimator_args(b.mc_num, b.batch_size, b.cfg_scale, prefix="benchmark.")
    if b.limit is not None and b.limit <= 0:
        raise ConfigError(f"benchmark.limit={b.limit} must be > 0 (items per task, or a "
                          "fraction below 1) or null (every item)")
    for key, low in (("max_items", 1), ("context_words", 1), ("continuation_words", 1),
                     ("choices", 2)):
        if b[key] < low:
            raise ConfigError(f"benchmark.{key}={b[key]} must be >= {low}")
    for task, shots in b.num_fewshot.items():
        if task not in tasks:
            raise ConfigError(f"benchmark.num_fewshot names {task!r}, which is not in "
                              f"benchmark.tasks ({', '.join(tasks)})")
        if shots < 0:
            raise ConfigError(f"benchmark.num_fewshot.{task}={shots} must be >= 0")
    if str(b.greedy).lower() not in ("auto", "true", "false"):
        raise ConfigError(f"benchmark.greedy={b.greedy!r}; accepted: auto, true, false")
    if cfg.task.device not in DEVICES:
        raise ConfigError(f"task.device={cfg.task.device!r}; accepted: {', '.join(DEVICES)}")
    # a suite naming its own sampler preset (benchmark.sampler) starts from that preset's
    # settings, not the sampler group's; benchmark.generation is set over either
    overrides = {} if b.get("sampler") else {
        k: v for k, v in OmegaConf.to_container(cfg.sampler, resolve=True).items()
        if k in SAMPLER_FIELDS and k != "cfg_scale"}
    generation = b.get("generation")
    generation = OmegaConf.to_container(generation, resolve=True) if generation else {}
    unknown = sorted(set(generation) - set(SAMPLER_FIELDS))
    if unknown:
        raise ConfigError(f"benchmark.generation.{unknown[0]} is not a sampler setting; accepted: "
                          f"{', '.join(SAMPLER_FIELDS)}")
    overrides.update(generation)
    sampler_settings(suite_sampler(cfg), overrides)
    return overrides


def suite_sampler(cfg: DictConfig) -> str:
    """Return the sampler preset the suite generates with (benchmark.sampler, else sampler=)."""
    return cfg.benchmark.get("sampler") or cfg.sampler.name


def check_suite_data(cfg: DictConfig) -> None:
    """Raise ConfigError unless the dataset suits the offline tasks (after the export's groups)."""
    from ldm.harness.suites import TEXT_TASKS

    b, tasks = cfg.benchmark, list(cfg.benchmark.tasks)
    if not b.hub:
        text = [t for t in tasks if t in TEXT_TASKS]
        if text and cfg.dataset.kind != "text":
            raise ConfigError(f"benchmark tasks {', '.join(text)} are built from held-out text; "
                              f"dataset={cfg.dataset.name} is chat data: use dataset=shakespeare "
                              "or dataset=local_text")
        if "synthetic" in tasks and cfg.dataset.source != "synthetic":
            raise ConfigError(f"benchmark task synthetic needs dataset=synthetic_tasks, not "
                              f"dataset={cfg.dataset.name}")


def require_lm_eval() -> None:
    """Raise ConfigError unless lm-eval 0.4 is installed."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("task=benchmark needs lm-eval 0.4: pip install -e '.[bench]' "
                          "(make installs it)")


def build_offline_suite(cfg: DictConfig, ckpt, tok, folder: Path) -> Path:
    """Build the offline tasks from the prepared test split into `folder`; return it."""
    from ldm.harness.suites import (TEXT_TASKS, build_synthetic_items, build_text_items,
                                      write_suite)
    from ldm.data.store import load_prepared
    from ldm.tasks.prepared import check_data_vocabulary, prepare_command, prepared_data_dir
    from ldm.tokenizer import load_tokenizer

    b = cfg.benchmark
    data_dir = prepared_data_dir(cfg)
    command = prepare_command(cfg)
    splits, manifest = load_prepared(data_dir, command)
    test = splits["test"]
    if len(test) == 0:
        raise DataError(f"the test split of {data_dir} is empty; prepare it with a larger "
                        "dataset.test_split_pct")
    check_data_vocabulary(tok, load_tokenizer(str(data_dir / "tokenizer")), cfg.checkpoint,
                          data_dir, command)
    items: Dict[str, List[dict]] = {}
    text_tasks = [t for t in b.tasks if t in TEXT_TASKS]
    if text_tasks:
        items.update(build_text_items(test, tok, text_tasks, count=b.max_items,
                                      context_words=b.context_words,
                                      continuation_words=b.continuation_words,
                                      choices=b.choices, seed=cfg.seed,
                                      max_positions=ckpt.max_positions))
    if "synthetic" in b.tasks:
        items["synthetic"] = build_synthetic_items(test, manifest, tok, b.max_items, data_dir,
                                                   command, cfg.sampler.max_new_tokens,
                                                   ckpt.max_positions)
    source = {"data_dir": str(data_dir), "fingerprint": manifest.get("fingerprint", ""),
              "dataset": cfg.dataset.name, "seed": cfg.seed}
    return write_suite(folder, items, source, max_gen_toks=cfg.sampler.max_new_tokens)


def metric_rows(results: Dict[str, Any]) -> Dict[str, float]:
    """Return {"<task>.<metric>[.<filter>]": value} of every numeric result of the harness."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or "," not in key:
                continue
            metric, _, filt = key.partition(",")
            name = f"{task}.{metric}" + ("" if filt in ("none", "") else f".{filt}")
            out[name] = float(value)
    return out


def headline(results: Dict[str, Any], tasks: List[str]) -> tuple:
    """Return (metric name, value) of the first task's accuracy-like metric."""
    rows = metric_rows(results)
    for task in tasks:
        for metric in ("acc", "exact_match", "acc_norm"):
            for name, value in rows.items():
                if name.startswith(f"{task}.{metric}") and "stderr" not in name:
                    return name, value
    return "", float("nan")


def run(cfg: DictConfig) -> float:
    """Run the benchmark suite on the checkpoint; return the headline metric (higher is better)."""
    from ldm.harness.suites import HARNESS_NAMES
    from ldm.hub import require_hub
    from ldm.tasks.checkpoints import resolve_checkpoint, with_export_groups
    from ldm.tasks.common import check_tracking, open_tracker, run_dir

    overrides = validate(cfg)
    check_tracking(cfg)
    b = cfg.benchmark
    if b.hub:
        require_hub(f"benchmark={b.name} (harness tasks {', '.join(b.tasks)})", OFFLINE_SUITES)
    require_lm_eval()
    ckpt = resolve_checkpoint(cfg.checkpoint, "benchmark")
    cfg = with_export_groups(cfg, ckpt)
    check_suite_data(cfg)
    tok = ckpt.load_tokenizer()
    folder = run_dir(cfg)
    include = None
    if b.hub:
        tasks = list(b.tasks)
    else:
        include = build_offline_suite(cfg, ckpt, tok, folder / "tasks")
        tasks = [HARNESS_NAMES[t] for t in b.tasks]

    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable, make_table

    from ldm.harness.adapter import LdmLM

    # offline suites need none of the harness's own tasks (indexing them takes many seconds)
    manager = TaskManager(include_path=str(include) if include else None,
                          include_defaults=include is None)
    if b.hub:
        unknown = [t for t in tasks if not manager.match_tasks([t])]
        if unknown:
            raise ConfigError(f"benchmark.tasks: {unknown[0]!r} is not an lm-eval task or group; "
                              "see `lm_eval ls tasks`")
    lm = LdmLM(pretrained=ckpt.where, mc_num=b.mc_num, batch_size=b.batch_size,
               cfg_scale=b.cfg_scale, sampler=suite_sampler(cfg), greedy=b.greedy, seed=cfg.seed,
               device=cfg.task.device, dtype=cfg.model.dtype, chat=bool(b.get("chat")),
               **overrides)
    shots = dict(b.num_fewshot)
    by_shots: Dict[Any, List[str]] = {}
    for name, task in zip(b.tasks, tasks):
        by_shots.setdefault(shots.get(name), []).append(task)
    results: Dict[str, Any] = {}
    samples: Dict[str, Any] = {}
    for fewshot, group in by_shots.items():
        part = lm_eval.simple_evaluate(model=lm, tasks=group, num_fewshot=fewshot,
                                       limit=b.limit, log_samples=b.log_samples,
                                       task_manager=manager, random_seed=cfg.seed,
                                       numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
                                       fewshot_random_seed=cfg.seed)
        samples.update(part.pop("samples", {}) or {})
        for key, value in part.items():
            if isinstance(value, dict) and isinstance(results.get(key), dict):
                results[key].update(value)
            else:
                results.setdefault(key, value)
    speed = lm.summary()
    results["ldm"] = {"checkpoint": ckpt.where, "suite": b.name, "include_path": str(include),
                      "speed": speed}
    path = folder / RESULTS
    path.write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
    sample_files = []
    for task, rows in samples.items():
        sample_path = folder / f"samples_{task}.jsonl"
        sample_path.write_text("".join(json.dumps(r, default=handle_non_serializable) + "\n"
                                       for r in rows))
        sample_files.append(sample_path)
    metrics = {**metric_rows(results), **speed}
    name, value = headline(results, tasks)
    with open_tracker(cfg) as tracker:
        tracker.set_tags({"ldm.checkpoint": ckpt.where, "ldm.benchmark": b.name,
                          "ldm.run_dir": str(folder), "ldm.headline_metric": name,
                          "ldm.headline_direction": "higher"})
        tracker.log_metrics(metrics, step=0)
        tracker.log_artifact(path, "benchmark")
        for sample_path in sample_files:
            tracker.log_artifact(sample_path, "benchmark/samples")
    print(make_table(results))
    for key, val in speed.items():
        print(f"{key}: {val:.4g}")
    print(f"results: {path}")
    if include is not None:
        print(f"the same with the harness's command line:\n  lm_eval --model ldm --model_args "
              f"pretrained={ckpt.where},mc_num={b.mc_num},sampler={suite_sampler(cfg)}"
              f"{',chat=true' if b.get('chat') else ''} "
              f"--tasks {','.join(tasks)} --include_path {include}")
        from ldm.harness.plugin import registration_note

        note = registration_note()
        if note:
            print(f"note: {note}")
    print(f"headline {name} = {value:.4f} (higher is better)")
    return float(value)
