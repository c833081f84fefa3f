"""Minimal MLM training command for the engine tests: a tiny LittleBirdForMaskedLM on random
token data with random masking (deterministic per sample index, so any data-parallel layout
and any resume point sees the same samples).

Run under torchrun / deepspeed / accelerate, or alone. Extra flags for the tests:
  --dropout P            model dropout (exercises RNG restore on resume)
  --step-delay S         sleep S seconds per micro-batch (lets a test SIGKILL mid-run)
  --crash-in-save-at N   raise inside the checkpoint save of step N, after every file is
                         written and before the commit rename
  --dump-logits          after training, write OUT/ref_logits.pt: the trained model's logits
                         on a fixed input (computed through the DeepSpeed engine)
  --poison-samples I,J   samples I, J, ... make the loss NaN (an isolated spike in the data);
                         with --no-shuffle, step s of one process at --batch-size 2 reads
                         samples 2(s-1) and 2(s-1)+1
  --no-shuffle           read the samples in order
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from littlebird_ds.train import checkpoint as ckpt_mod  # noqa: E402
from littlebird_ds.train.engine import Trainer, add_training_arguments, finish_worker  # noqa: E402

VOCAB, SEQ, MASK_ID = 97, 32, 4


class RandomMLM(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    poison: frozenset = frozenset()

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(1000 + i)
        ids = torch.randint(5, 25, (SEQ,), generator=g)  # a skewed unigram distribution: learnable in a few steps
        length = int(torch.randint(SEQ // 2, SEQ + 1, (1,), generator=g))
        mask = torch.zeros(SEQ, dtype=torch.long)
        mask[:length] = 1
        ids[length:] = 0
        chosen = (torch.rand(SEQ, generator=g) < 0.25) & mask.bool()
        chosen[1] = True  # at least one target per sequence
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        inputs = torch.where(chosen, torch.full_like(ids, MASK_ID), ids)
        item = {"input_ids": inputs, "attention_mask": mask, "labels": labels}
        if self.poison:
            item["poison"] = torch.tensor(i in self.poison)
        return item


def main():
    p = argparse.ArgumentParser()
    add_training_arguments(p)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--n-samples", type=int, default=64)
    p.add_argument("--step-delay", type=float, default=0.0)
    p.add_argument("--crash-in-save-at", type=int, default=0)
    p.add_argument("--dump-logits", action="store_true")
    p.add_argument("--poison-samples", default="")
    p.add_argument("--no-shuffle", action="store_true")
    args = p.parse_args()

    if args.crash_in_save_at:
        def crash(self, tmp_dir):
            if tmp_dir.name.endswith(f"step_{args.crash_in_save_at:08d}"):
                raise RuntimeError(f"simulated crash while saving {tmp_dir}")
        ckpt_mod.CheckpointManager._before_commit = crash

    from littlebird_ds import LittleBirdConfig, LittleBirdForMaskedLM

    def model_factory():
        cfg = LittleBirdConfig(vocab_size=VOCAB, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=48, block_size=8, pack_size=5, hidden_dropout_prob=args.dropout,
                               attention_probs_dropout_prob=args.dropout, attention_kernel="eager")
        return LittleBirdForMaskedLM(cfg)

    def loss_fn(model, batch):
        if args.step_delay:
            time.sleep(args.step_delay)
        poison = batch.pop("poison", None)
        out = model(**batch)
        loss = out.loss * float("nan") if poison is not None and bool(poison.any()) else out.loss
        return loss, {"masked": float((batch["labels"] != -100).sum())}

    def eval_fn(model, step):
        batch = RandomMLM(4)[0]
        batch.pop("poison", None)
        out = model(**{k: v.unsqueeze(0) for k, v in batch.items()})
        return {"loss": float(out.loss)}

    RandomMLM.poison = frozenset(int(x) for x in args.poison_samples.split(",") if x)
    trainer = Trainer(args, model_factory=model_factory, loss_fn=loss_fn, train_dataset=RandomMLM(args.n_samples),
                      eval_fn=eval_fn, shuffle=not args.no_shuffle)
    result = trainer.fit()
    if args.dump_logits:
        engine = trainer.engine
        engine.eval()
        ids = torch.randint(5, VOCAB, (2, 29), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            logits = engine(input_ids=ids).logits
        if trainer.rank == 0:
            torch.save({"input_ids": ids, "logits": logits.float()}, os.path.join(args.out, "ref_logits.pt"))
    if trainer.rank == 0:
        print("RESULT " + " ".join(f"{s}:{v!r}" for s, v in sorted(result.losses.items())), flush=True)
    finish_worker()


if __name__ == "__main__":
    main()
