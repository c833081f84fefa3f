"""Fine-tune LittleBird for extractive QA, with Padding Insertion and an optional length curriculum.

Starts from a pretrained model (--model DIR) or from a preset with random weights
(--preset tiny --tokenizer DIR). Training windows are --max-length tokens; with
probability --padding-insertion (default 0.5) a batch gets pads spread through its
contexts up to --pi-max-length tokens (default 8 x the training length), so a model
trained on short contexts reads long ones (--no-padding-insertion turns it off).
--curriculum 128:0.7,256:0.2,512:0.1 trains 70% of the steps at 128 tokens, then 256,
then 512. Validation files are scored with SQuAD EM/F1 (one row per file, e.g. per
context length). Writes OUT/metrics.jsonl, OUT/tb/, checkpoints, OUT/eval_results.json
and OUT/final (model + tokenizer, loads with AutoModelForQuestionAnswering). Bad inputs
(answers not matching their context, a question longer than block 0, an empty context)
fail before anything is written.

Example:
  littlebird-ds finetune-qa --preset tiny --tokenizer out/tok --train out/qa/train-512.json \\
      --validation out/qa/validation-512.json,out/qa/validation-4096.json \\
      --curriculum 128:0.7,256:0.2,512:0.1 --batch-size 16 --lr 1e-3 --max-steps 3000 --out out/qa-model
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from littlebird_ds.train.finetune_qa import add_finetune_arguments

    add_finetune_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from littlebird_ds.train.engine import finish_worker, normalize_training_args
    from littlebird_ds.train.finetune_qa import finetune_qa

    try:
        normalize_training_args(args)  # before any data is read or anything written
        result = finetune_qa(args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"finetune-qa: error: {e}") from None
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        ev = result["eval"]
        summary = f"; validation EM {ev['exact_match']:.2f} F1 {ev['f1']:.2f}" if ev else ""
        print(f"finetune-qa: {result['step']} steps, model in {result['final_dir']}{summary}", flush=True)
    finish_worker(0)
    return 0
