"""The Hugging Face Trainer under torchrun (2 CPU processes, gloo) with a mid-run unfreeze:
``python -m torch.distributed.run --nproc-per-node 2 trainer_app.py OUT [plain]``. Each rank writes
``OUT/rank{R}.json`` with the checksum of every parameter and the callback's sync checks; with
``plain``, the stock Trainer is used, and the callback must refuse rather than let the ranks drift.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import leave_now, write_rank  # noqa: E402
from test_transformers import Pairs, bert, callback  # noqa: E402

from freezekit.integrations.transformers import FreezekitTrainer  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    freeze = callback()
    args = TrainingArguments(output_dir=str(out / "run"), per_device_train_batch_size=2, num_train_epochs=3,
                             learning_rate=5e-3, save_strategy="no", logging_strategy="no", report_to=[],
                             use_cpu=True, seed=3, disable_tqdm=True, ddp_backend="gloo")
    cls = Trainer if "plain" in sys.argv else FreezekitTrainer
    run = cls(model=bert(), args=args, train_dataset=Pairs(), callbacks=[freeze])
    run.train()
    write_rank(out, dist.get_rank(), run.model, freeze.sync_checks)


if __name__ == "__main__":
    main()
    leave_now()
