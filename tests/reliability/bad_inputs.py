"""The bad-input table: one row per bad input, run as `python run.py ARGS` by test_bad_inputs.py.

Every row must exit non-zero with one stderr line that holds every string of `expect` (the bad
value and what would be accepted), print no Python traceback, and write nothing a later stage
reads (no prepared data manifest, no export, no complete checkpoint). Hydra's own composition
errors span a few lines: there the first string must be on one line, the others anywhere.

Placeholders in args, filled in by the test:
  {data}    the shared prepared-data root (paths.data=...) of the tiny text data set
  {corpus}  the dataset.paths override of the tiny text corpus
  {export}  a tiny pretraining export          {chat}  a tiny chat (SFT-like) export
  {files}   a folder of bad files (see test_bad_inputs.BAD_FILES)
  {bad}     a folder of damaged exports and checkpoints (see test_bad_inputs.damaged)
  {ckpt}    a complete checkpoint of the tiny pretraining run (step 2)
  {busy_port} a loopback port another socket listens on

To add a case: append a row. `kind="ldm"` rows must fail with exactly one `error:` line (our own
errors); `kind="hydra"` rows fail in Hydra's config composition, which prints its own message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

TINY = ("model=modernbert_tiny model.vocab_size=320 model.arch.hidden_size=32 "
        "model.arch.num_hidden_layers=2 model.arch.num_attention_heads=2 "
        "model.arch.intermediate_size=64 model.max_positions=128 context=ctx64").split()
PRETRAIN = ["task=pretrain", *TINY, "dataset=local_text", "{corpus}", "paths.data={data}",
            "task.max_steps=2", "task.global_batch_size=4", "hardware.micro_batch_size=2",
            "hardware.gradient_accumulation_steps=2", "tracking=off"]
PREPARE_TEXT = ["task=prepare", *TINY, "dataset=local_text", "tracking=off"]
PREPARE_CHAT = ["task=prepare", *TINY, "dataset=local_chat", "init_from={export}", "tracking=off"]
SAMPLE = ["task=sample", "checkpoint={chat}", "sampler.max_new_tokens=8", "sampler.steps=8",
          "sampler.block_length=8", "tracking=off"]
BENCH = ["task=benchmark", *TINY, "dataset=local_text", "{corpus}", "paths.data={data}",
         "checkpoint={export}", "tracking=off"]
SERVE = ["task=serve", "checkpoint={chat}", "tracking=off"]
LONG_PROMPT = "prompt='" + " ".join(["the king spoke to the queen"] * 40) + "'"
# pretrain on other files than the prepared corpus ({corpus} left out)
PRETRAIN_OTHER = [a for a in PRETRAIN if a != "{corpus}"]
SFT = ["task=sft", *TINY, "dataset=synthetic_tasks", "dataset.max_documents=60",
       "paths.data={data}", "task.max_steps=2", "task.global_batch_size=4",
       "hardware.micro_batch_size=2", "hardware.gradient_accumulation_steps=2", "tracking=off"]
EVALUATE = ["task=evaluate", "checkpoint={export}", *TINY, "dataset=local_text",
            "paths.data={data}", "tracking=off"]


@dataclass(frozen=True)
class Case:
    """One bad input: run.py arguments and what its one error line must say."""

    id: str
    args: Tuple[str, ...]
    expect: Tuple[str, ...]
    kind: str = "ldm"  # ldm | hydra
    extra: dict = field(default_factory=dict, hash=False, compare=False)


def case(id: str, args: List[str], *expect: str, kind: str = "ldm") -> Case:
    return Case(id, tuple(args), tuple(expect), kind)


CASES = [
    # --- config values and overrides --------------------------------------------------------
    case("max_steps_zero", [*PRETRAIN, "task.max_steps=0"], "task.max_steps=0", ">= 1"),
    case("negative_lr", [*PRETRAIN, "task.lr=-1"], "task.lr=-1", "> 0"),
    case("unknown_lr_schedule", [*PRETRAIN, "task.lr_schedule=step"], "'step'", "cosine"),
    case("unknown_precision", [*PRETRAIN, "hardware.mixed_precision=fp8"], "'fp8'", "bf16"),
    case("unknown_dtype", [*PRETRAIN, "model.dtype=float8"], "'float8'", "bfloat16"),
    case("unknown_attention", [*PRETRAIN, "model.attn_implementation=flash"], "'flash'", "sdpa"),
    case("batch_layout_mismatch", [*PRETRAIN, "task.global_batch_size=6"],
         "task.global_batch_size=6", "hardware.micro_batch_size=2"),
    case("context_beyond_positions", [*PRETRAIN, "model.max_positions=32"],
         "context.length=64", "max_positions=32"),
    case("run_name_escapes_outputs", [*PRETRAIN, "run_name=../escape"], "run_name='../escape'",
         "letters"),
    case("server_tracking_without_uri",
         [a for a in PRETRAIN if a != "tracking=off"] + ["tracking=mlflow_server"], "tracking.uri",
         "http://"),
    case("typo_in_key", [*PRETRAIN, "task.max_stepz=3"], "max_stepz", kind="hydra"),
    case("wrong_type", [*PRETRAIN, "task.max_steps=many"], "'many'", "Integer", kind="hydra"),
    case("unknown_option", [*PRETRAIN, "model=bertish"], "model/bertish", "minilm", kind="hydra"),
    case("unknown_task", ["task=finetune"], "task/finetune", "pretrain", kind="hydra"),
    # --- data files --------------------------------------------------------------------------
    case("truncated_jsonl", [*PREPARE_CHAT, "dataset.paths=[{files}/truncated.jsonl]"],
         "truncated.jsonl:3", "not valid JSON"),
    case("wrong_chat_schema", [*PREPARE_CHAT, "dataset.paths=[{files}/wrong_schema.jsonl]"],
         "wrong_schema.jsonl", "none of the chat schemas"),
    case("unknown_chat_role", [*PREPARE_CHAT, "dataset.paths=[{files}/bad_role.jsonl]"],
         "bad_role.jsonl:1", "robot"),
    case("chat_content_not_text", [*PREPARE_CHAT, "dataset.paths=[{files}/content_number.jsonl]"],
         "content_number.jsonl:1", "int"),
    case("empty_chat_file", [*PREPARE_CHAT, "dataset.paths=[{files}/empty.jsonl]"],
         "empty.jsonl"),
    case("huge_single_line", [*PREPARE_CHAT, "dataset.paths=[{files}/huge_line.jsonl]"],
         "longer than the context of 64 tokens", "overlong=truncate"),
    case("binary_text_file", [*PREPARE_TEXT, "dataset.paths=[{files}/binary.txt]"],
         "binary.txt", "UTF-8"),
    case("empty_text_file", [*PREPARE_TEXT, "dataset.paths=[{files}/empty.txt]"], "empty"),
    case("text_field_not_text", [*PREPARE_TEXT, "dataset.paths=[{files}/text_number.jsonl]"],
         "text_number.jsonl:1", "'text'"),
    case("jsonl_lines_not_objects", [*PREPARE_TEXT, "dataset.paths=[{files}/arrays.jsonl]"],
         "arrays.jsonl:1", "'text'"),
    case("parquet_that_is_not", [*PREPARE_TEXT, "dataset.paths=[{files}/fake.parquet]"],
         "fake.parquet", "parquet"),
    case("unsupported_suffix", [*PREPARE_TEXT, "dataset.paths=[{files}/table.csv]"],
         "table.csv", ".jsonl"),
    # --- prompts -----------------------------------------------------------------------------
    case("empty_prompt", [*SAMPLE, "prompt=''"], "prompt is empty"),
    case("prompt_longer_than_model", [*SAMPLE, LONG_PROMPT], "max_positions=128", "shorten"),
    case("control_characters_in_prompt", [*SAMPLE, "prompt='hello\x1b[2Jworld'"],
         "control character", "U+001B"),
    case("nul_in_prompts_file", [*SAMPLE, "prompts_file={files}/nul_prompt.txt"],
         "control character", "U+0000"),
    case("missing_prompts_file", [*SAMPLE, "prompts_file={files}/absent.txt"], "absent.txt",
         ".jsonl"),
    case("prompts_file_bad_json", [*SAMPLE, "prompts_file={files}/prompts_bad.jsonl"],
         "line 2", "not JSON"),
    case("infill_without_span", [*SAMPLE, "infill='no span here'"], "[MASK:N]"),
    case("sampler_zero_steps", [*SAMPLE, "prompt=hi", "sampler.steps=0"], "steps"),
    # --- checkpoints and exports ---------------------------------------------------------------
    case("checkpoint_missing", [*SAMPLE, "prompt=hi", "checkpoint={bad}/absent"], "absent",
         "outputs/models"),
    case("checkpoint_without_tokenizer", [*SAMPLE, "prompt=hi", "checkpoint={bad}/no_tokenizer"],
         "no_tokenizer", "tokenizer"),
    case("checkpoint_truncated_safetensors",
         [*SAMPLE, "prompt=hi", "checkpoint={bad}/truncated_chat"],
         "truncated_chat", "model.safetensors"),
    case("checkpoint_wrong_architecture", [*SAMPLE, "prompt=hi", "checkpoint={bad}/causal_lm"],
         "causal_lm", "masked"),
    case("checkpoint_corrupt_config", [*SAMPLE, "prompt=hi", "checkpoint={bad}/bad_config"],
         "bad_config", "config.json"),
    case("init_from_incompatible_version", [*PRETRAIN, "init_from={bad}/future_versions"],
         "future_versions", "transformers 99.0.0"),
    case("init_from_truncated_safetensors", [*PRETRAIN, "init_from={bad}/truncated_weights"],
         "truncated_weights", "model.safetensors"),
    case("resume_from_missing", [*PRETRAIN, "task.resume_from={bad}/absent"], "absent",
         "step-"),
    case("resume_truncated_safetensors", [*PRETRAIN, "task.resume_from={bad}/ckpt_truncated"],
         "ckpt_truncated", "model.safetensors"),
    case("resume_pickled_code_in_optimizer", [*PRETRAIN, "task.resume_from={bad}/ckpt_pickle"],
         "ckpt_pickle", "optimizer.bin"),
    case("resume_other_architecture",
         [*PRETRAIN, "model.arch.hidden_size=48", "task.resume_from={ckpt}"],
         "step-0000002", "architecture"),
    # --- benchmarks (task=benchmark) -------------------------------------------------------------
    case("benchmark_unknown_suite", [*BENCH, "benchmark=squad_v9"], "benchmark/squad_v9",
         "offline", kind="hydra"),
    case("benchmark_unknown_task", [*BENCH, "benchmark.tasks=[squad]"], "'squad'", "cloze"),
    case("benchmark_hub_suite_offline", [*BENCH, "benchmark=bert_chat"], "benchmark=bert_chat",
         "benchmark=offline"),
    case("benchmark_checkpoint_not_an_export", [*BENCH, "checkpoint={files}"], "not an export",
         "outputs/models"),
    case("benchmark_mc_num_zero", [*BENCH, "benchmark.mc_num=0"], "benchmark.mc_num=0", ">= 1"),
    case("benchmark_passage_beyond_positions", [*BENCH, "benchmark.context_words=150"],
         "benchmark.context_words=150", "128 positions"),
    # --- issue 12: data identity, settings checked before anything is written, sample runs ---
    case("pretrain_on_files_never_prepared",
         [*PRETRAIN_OTHER, "dataset.paths=[{files}/other.txt]"], "no prepared data",
         "other.txt", "exists only for other sources", "doc000.txt"),
    case("evaluate_on_files_never_prepared",
         [*EVALUATE, "dataset.paths=[{files}/other.txt]"], "no prepared data", "other.txt",
         "exists only for other sources"),
    case("pretrain_dataset_paths_is_a_folder", [*PRETRAIN_OTHER, "dataset.paths=[{files}]"],
         "is a folder", "/*.txt"),
    case("prepare_dataset_paths_is_a_folder", [*PREPARE_TEXT, "dataset.paths=[{files}]"],
         "is a folder", "/*.txt"),
    case("masking_eps_out_of_range", [*PRETRAIN, "masking.eps=2"], "masking.eps=2", "[0, 1)"),
    case("masking_unknown_time_sampling", [*PRETRAIN, "masking.time_sampling=stratified"],
         "'stratified'", "antithetic"),
    case("masking_unknown_schedule", [*PRETRAIN, "masking.schedule=sqrt"], "'sqrt'", "cosine"),
    case("masking_unknown_normalizer", [*PRETRAIN, "masking.normalizer=bogus"], "'bogus'",
         "sequence"),
    case("micro_batch_zero", [*PRETRAIN, "hardware.micro_batch_size=0"],
         "hardware.micro_batch_size=0", ">= 1"),
    case("accumulation_zero", [*PRETRAIN, "hardware.gradient_accumulation_steps=0"],
         "gradient_accumulation_steps=0", ">= 1"),
    case("pretrain_on_chat_data",
         [a.replace("dataset=local_text", "dataset=synthetic_tasks") for a in PRETRAIN_OTHER],
         "kind 'text'", "synthetic_tasks"),
    case("sft_on_text_data",
         [a.replace("dataset=synthetic_tasks", "dataset=local_text") for a in SFT] + ["{corpus}"],
         "kind 'chat'", "local_text"),
    case("sft_eval_sampler_threshold_above_one", [*SFT, "sampler.threshold=1.5"],
         "sampler.threshold=1.5", "(0, 1]"),
    case("sft_eval_sampler_block_not_dividing", [*SFT, "sampler.max_new_tokens=16"],
         "block_length=32", "sampler.max_new_tokens=16"),
    case("sft_eval_sampler_negative_temperature", [*SFT, "sampler.temperature=-1"],
         "sampler.temperature=-1", ">= 0"),
    case("sft_eval_sampler_unknown_remasking", [*SFT, "sampler.remasking=best"], "'best'",
         "low_confidence"),
    case("schema_option_is_not_a_task", ["task=schema_train", "tracking=off"],
         "task=schema_train", "known tasks"),
    case("chat_file_too_small_to_split", [*PREPARE_CHAT, "dataset.paths=[{files}/two.jsonl]"],
         "test split has no example", "dataset.split_seed"),
    case("text_too_small_to_split", [*PREPARE_TEXT, "dataset.paths=[{files}/other.txt]"],
         "no complete row", "dataset.txt_unit=paragraph", "dataset.split_seed"),
    case("test_split_pct_one", [*PREPARE_TEXT, "{corpus}", "dataset.test_split_pct=1.0"],
         "dataset.test_split_pct=1.0", "(0, 1)"),
    case("unknown_last_row", [*PREPARE_TEXT, "{corpus}", "task.last_row=keep"], "'keep'",
         "drop, pad"),
    case("prepare_zero_workers", [*PREPARE_TEXT, "{corpus}", "task.num_workers=0"],
         "task.num_workers=0", ">= 1"),
    case("max_documents_one", [*PREPARE_TEXT, "{corpus}", "dataset.max_documents=1"],
         "dataset.max_documents=1", ">= 2"),
    case("context_below_minimum", [*PREPARE_TEXT, "{corpus}", "context.length=8"],
         "context.length=8", "16"),
    case("unknown_chat_padding", [*PREPARE_CHAT, "dataset.paths=[{files}/two.jsonl]",
                                  "dataset.padding=left"], "'left'", "eos, dynamic, answer"),
    case("answer_padding_without_positions", [*PREPARE_CHAT, "dataset.paths=[{files}/two.jsonl]",
                                              "dataset.padding=answer"],
         "dataset.answer_positions", "an integer in 2..63"),
    case("unknown_chat_overlong", [*PREPARE_CHAT, "dataset.paths=[{files}/two.jsonl]",
                                   "dataset.overlong=cut"], "'cut'", "drop, truncate"),
    case("unknown_answer_turns", [*PREPARE_CHAT, "dataset.paths=[{files}/two.jsonl]",
                                  "dataset.answer_turns=first"], "'first'", "all, last"),
    case("unknown_synthetic_task_type", ["task=prepare", *TINY, "dataset=synthetic_tasks",
                                         "dataset.task_types=[juggle]", "tracking=off"],
         "juggle", "copy"),
    case("sample_gif_without_out", [*SAMPLE, "prompt=hi", "render=gif"], "render=gif",
         "out="),
    case("sample_two_prompt_sources", [*SAMPLE, "prompt=hi", "interactive=true"],
         "prompt and interactive"),
    case("sample_interactive_without_chat", [*SAMPLE, "interactive=true", "chat=false"],
         "interactive=true", "chat=true"),
    case("sample_threshold_above_one", [*SAMPLE, "prompt=hi", "sampler.threshold=1.5"],
         "sampler.threshold=1.5", "(0, 1]"),
    case("sample_unknown_device", [*SAMPLE, "prompt=hi", "task.device=tpu"], "'tpu'", "cpu"),
    case("sample_chat_on_a_pretraining_export",
         [*SAMPLE, "prompt=hi", "checkpoint={export}"], "no chat template", "chat=false"),
    case("sample_without_prompt", SAMPLE, "no prompt given", "interactive=true"),
    case("evaluate_zero_t_grid", [*EVALUATE, "{corpus}", "task.t_grid=0"], "task.t_grid=0",
         ">= 1"),
    case("prompt_with_an_unquoted_comma", [*SAMPLE, "prompt=Hello, world"],
         "prompt=Hello, world", "quote the value", kind="hydra"),
    # --- task=serve: every bad input fails before the server starts -----------------------------
    case("serve_checkpoint_missing", [*SERVE, "checkpoint={bad}/absent"], "absent",
         "outputs/models"),
    case("serve_folder_not_an_export", [*SERVE, "checkpoint={files}"], "is not an export",
         "config.json"),
    case("serve_export_without_chat_template", [*SERVE, "checkpoint={export}"],
         "no chat template", "SFT export"),
    case("serve_port_in_use", [*SERVE, "serve.port={busy_port}"], "serve.port=",
         "in use"),
    case("serve_unknown_sampler_preset", [*SERVE, "sampler=turbo"], "sampler/turbo", "llada",
         kind="hydra"),
    case("serve_bad_sampler_setting", [*SERVE, "sampler.block_length=7"], "block_length=7",
         "divide"),
    case("serve_zero_concurrency", [*SERVE, "serve.concurrency=0"], "serve.concurrency=0",
         ">= 1"),
    # removed: nothing read it (the loop has no DataLoader)
    case("removed_dataloader_workers", [*PRETRAIN, "hardware.dataloader_workers=4"],
         "dataloader_workers", kind="hydra"),
    case("unknown_attention_names_auto", [*PRETRAIN, "model.attn_implementation=xformers"],
         "'xformers'", "auto"),
    # moved to hardware.compile (a property of the machine, like mixed precision)
    case("compile_is_a_hardware_option", [*PRETRAIN, "model.compile=true"], "compile",
         kind="hydra"),
    # --- sampler cache and entropy-bounded rule --------------------------------------------------
    case("sampler_cache_unknown", [*SAMPLE, "prompt=hi", "sampler.cache=full"], "'full'",
         "prefix, dual"),
    case("sampler_cache_unsupported_family",
         [*SAMPLE, "prompt=hi", "sampler.cache=dual", "checkpoint={bad}/causal_lm"],
         "sampler.cache='dual'", "bert, modernbert", "'gpt2'"),
    case("sampler_gamma_zero",
         [*SAMPLE, "prompt=hi", "sampler.rule=entropy_bound", "sampler.gamma=0"],
         "sampler.gamma=0", "> 0"),
    case("sampler_gamma_without_entropy_bound", [*SAMPLE, "prompt=hi", "sampler.gamma=0.5"],
         "sampler.gamma=0.5", "entropy_bound"),
]

# --- hub chat data and weighted mixtures (dataset=hf_chat, dataset.mixture) --------------------
PREPARE_HF = ["task=prepare", *TINY, "dataset=hf_chat", "init_from={export}", "tracking=off"]
PREPARE_MIX = ["task=prepare", *TINY, "dataset=mixture_chat", "init_from={export}", "tracking=off"]
CASES += [
    case("hf_chat_without_chat_column",
         [*PREPARE_HF, "dataset.hub=[{{path: {files}/wrong_schema.jsonl}}]"],
         "wrong_schema.jsonl", "columns question, reply", "messages"),
    case("hf_chat_empty_split_slice",
         [*PREPARE_HF, "dataset.hub=[{{path: {files}/wrong_schema.jsonl, split: 'train[5:2]'}}]"],
         "train[5:2]", "selects no rows"),
    case("mixture_negative_weight",
         [*PREPARE_MIX, "dataset.mixture=[{{source: construction_faq, weight: -1}}]"],
         "weight=-1", ">= 0"),
    case("mixture_all_weights_zero",
         [*PREPARE_MIX, "dataset.mixture=[{{source: construction_faq, weight: 0}}]"],
         "every dataset.mixture weight is 0", "> 0"),
    case("mixture_unknown_source",
         [*PREPARE_MIX, "dataset.mixture=[{{source: wikipedia, weight: 1}}]"],
         "'wikipedia'", "construction_faq"),
    # --- chains --------------------------------------------------------------------------------
    case("chain_summary_names_no_stage",
         ["experiment=quickstart_smoke", "tracking=off", "task.summary.answers=nope"],
         "task.summary.answers", "'nope'"),
]
