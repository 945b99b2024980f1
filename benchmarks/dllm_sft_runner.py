"""One SFT run with dLLM's own trainer, for benchmarks/sft_throughput.py (its variant c).

Runs in a virtual environment where dLLM is installed (sft_throughput.py makes one from a dLLM
checkout); nothing of dLLM is copied here, only imported: its `MDLMTrainer` / `MDLMConfig`, its
`NoAttentionMaskWrapper` around `transformers.DataCollatorForSeq2Seq(padding=True)` and
`group_by_length=True`, the settings of dLLM's examples/bert/sft.py. Both sides read the same
rows: the train split ldm prepared (`dataset.padding=batch`: prompt, answer and its closing EOS,
unpadded), so tokens, chat template and answer masks are identical; labels are the answer tokens
(-100 on the prompt), and the collator pads inputs and labels with the pad id given (ldm's EOS,
as dLLM pads BERT rows with its EOS = PAD token: visible, trained). The model starts from the same
export folder ldm starts from.

    <dllm-venv>/bin/python benchmarks/dllm_sft_runner.py --init DIR --data DIR --pad-id N \\
        --steps 24 --batch-size 8 [--grad-accum 1] --lr 1e-4 --out result.json [--save DIR]

Prints one JSON object: per-step seconds (callback to callback), answer tokens (the useful ones:
answer_mask, before padding), label tokens (answers + padding) and total tokens per step.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", required=True, help="model folder both sides start from")
    ap.add_argument("--data", required=True, help="ldm prepared data folder (padding=batch)")
    ap.add_argument("--pad-id", type=int, required=True, help="pad id of inputs and labels (EOS)")
    ap.add_argument("--tokenizer", required=True,
                    help="a tokenizer folder this transformers reads (only its pad() is used: the "
                         "rows are token ids already)")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch")
    ap.add_argument("--grad-accum", type=int, default=1,
                    help="micro-batches per optimizer step (global batch = batch-size x this)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup-ratio", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", default=None, help="save the trained model here")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_DISABLED": "true",
                       "TOKENIZERS_PARALLELISM": "false"})
    import datasets
    import torch
    import transformers

    import dllm
    from dllm.core.trainers import MDLMConfig, MDLMTrainer

    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()

    shards = sorted(glob.glob(os.path.join(args.data, "train", "shard-*.arrow")))
    if not shards:
        sys.exit(f"no train split under {args.data}")
    rows = datasets.concatenate_datasets([datasets.Dataset.from_file(p) for p in shards])

    def to_features(row):
        ids = [int(i) for i in row["input_ids"]]
        labels = [i if m else -100 for i, m in zip(ids, row["answer_mask"])]
        return {"input_ids": ids, "labels": labels}

    train = rows.map(to_features, remove_columns=rows.column_names)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer)
    tokenizer.pad_token_id = args.pad_id  # dLLM's BERT rows: PAD is EOS, padded and trained
    tokenizer.padding_side = "right"
    model = transformers.AutoModelForMaskedLM.from_pretrained(args.init)

    steps = []

    class Counting(dllm.utils.CollatorWrapper):
        def before(self, features):
            steps.append({"answer_tokens": sum(sum(1 for y in f["labels"] if y != -100)
                                               for f in features)})
            return features

        def after(self, outputs):
            steps[-1]["total_tokens"] = int(outputs["input_ids"].numel())
            steps[-1]["label_tokens"] = int((outputs["labels"] != -100).sum())
            return outputs

    collator = Counting(dllm.utils.NoAttentionMaskWrapper(transformers.DataCollatorForSeq2Seq(
        tokenizer, return_tensors="pt", padding=True, label_pad_token_id=args.pad_id)))
    ends = []

    class Clock(transformers.TrainerCallback):
        def on_train_begin(self, *_, **__):
            ends.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as work:
        config = MDLMConfig(output_dir=work, group_by_length=True, learning_rate=args.lr,
                            per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                            gradient_accumulation_steps=args.grad_accum,
                            lr_scheduler_type="cosine", warmup_ratio=args.warmup_ratio,
                            bf16=False, use_cpu=True, report_to="none", eval_strategy="no",
                            save_strategy="no", logging_steps=10**9, disable_tqdm=True,
                            dataloader_num_workers=0, seed=args.seed)
        trainer = MDLMTrainer(model=model, processing_class=tokenizer, train_dataset=train,
                              args=config, data_collator=collator, callbacks=[Clock()])
        trainer.train()
        if args.save:
            trainer.save_model(args.save)
            tokenizer.save_pretrained(args.save)
    import resource

    seconds = [b - a for a, b in zip(ends, ends[1:])]
    # the collator counts micro-batches; an optimizer step is grad_accum of them
    k = args.grad_accum
    per_step = [{key: sum(m[key] for m in steps[i * k:(i + 1) * k]) for key in steps[i * k]}
                for i in range(min(len(seconds), len(steps) // k))]
    result = {"step_seconds": seconds[:len(per_step)], "steps": per_step,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "versions": {"transformers": transformers.__version__, "torch": torch.__version__}}
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
