"""freezekit in the Hugging Face Trainer, with the real Trainer (a BERT built from a small config, on
the CPU): parameters a phase unfreezes join the optimizer and train, their learning rate follows the
Trainer's schedule at lr_mult, a resume ends bit-identical to the uninterrupted run, and without the
optimizer sync the library warns."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from conftest import two_ranks

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import freezekit as fk
from freezekit.integrations.transformers import FreezekitCallback, FreezekitTrainer

STEPS_PER_EPOCH = 4
LR_MULT = 0.25


class Pairs(torch.utils.data.Dataset):
    def __init__(self, n: int = 4 * STEPS_PER_EPOCH, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 100, (n, 12), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": self.labels[i]}


def bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(config)


def callback() -> FreezekitCallback:
    return FreezekitCallback(
        policy=[{"freeze": "*"}, {"unfreeze": ["classifier", "bert.pooler"]}],  # a recipe's sections work too
        schedule=[{"at": 2, "policy": [{"unfreeze": "bert.encoder.layer.1"}], "lr_mult": LR_MULT}])


class LearningRates(TrainerCallback):
    """Each optimizer step's learning rate of every group, by group name."""

    def __init__(self):
        self.seen: list[dict[str, float]] = []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.seen.append({g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)})


def trainer(out, epochs: int, *callbacks, model=None, cls=FreezekitTrainer, **kwargs) -> Trainer:
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, num_train_epochs=epochs,
                             learning_rate=5e-3, lr_scheduler_type="linear", warmup_steps=2, weight_decay=0.01,
                             logging_strategy="no", report_to=[], use_cpu=True, seed=3, disable_tqdm=True,
                             dataloader_num_workers=0, **{"save_strategy": "epoch", **kwargs})
    return cls(model=model or bert(), args=args, train_dataset=Pairs(), callbacks=list(callbacks))


def test_a_phase_trains_new_parameters_at_the_trainers_schedule(tmp_path):
    rates, freeze = LearningRates(), callback()
    run = trainer(tmp_path, 4, freeze, rates)
    model = run.model
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n in start if n.startswith(("classifier", "bert.pooler"))}
    run.train()

    moved = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    layer1 = {n for n in start if n.startswith("bert.encoder.layer.1.")}
    assert layer1 and layer1 <= moved  # the phase's parameters trained
    assert moved == layer1 | {n for n in start if n.startswith(("classifier", "bert.pooler"))}  # nothing else
    held = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in held for p in model.parameters() if p.requires_grad)
    assert [(e.phase, e.at) for e in freeze.driver.events] == [(0, 2)]

    # Each new group's rate is lr_mult times the Trainer's own group's, step for step: warm-up, then
    # the linear decay, from the step the phase joined.
    joined = [step for step in rates.seen if len(step) > 2]
    assert len(joined) == 2 * STEPS_PER_EPOCH
    for step in joined:
        base, new = step["0"], [lr for name, lr in step.items() if name.startswith("sync")]
        assert new and all(lr == pytest.approx(base * LR_MULT, rel=1e-12) for lr in new)
    assert joined[-1]["0"] < joined[0]["0"]  # the schedule went on decaying


def test_resuming_from_a_trainer_checkpoint_ends_bit_identical(tmp_path):
    straight = trainer(tmp_path / "straight", 4, callback())
    straight.train()

    first = trainer(tmp_path / "resumed", 4, callback())
    first.train()  # the same run, which leaves checkpoint-12 after epoch 3 (the phase came at epoch 2)
    resumed = trainer(tmp_path / "resumed", 4, again := callback())
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / f"checkpoint-{3 * STEPS_PER_EPOCH}"))
    assert [e.replayed for e in again.driver.events] == [True]
    assert fk.state(resumed.model) == fk.state(straight.model)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [g["lr"] for g in straight.optimizer.param_groups]


def test_a_hand_written_callback_that_forgets_the_optimizer_is_warned(tmp_path):
    """The bug users hit: a callback applies a policy mid-run, the new parameters never join the
    optimizer, and nothing says so."""

    class Unfreeze(TrainerCallback):
        def on_epoch_begin(self, args, state, control, model=None, **kwargs):
            if round(state.epoch) == 1:
                fk.Policy(fk.unfreeze("bert.encoder.layer.1")).apply(model)

    probe = FreezekitCallback(policy=fk.Policy(fk.freeze("*"), fk.unfreeze("classifier")))
    run = trainer(tmp_path, 2, probe, Unfreeze(), cls=Trainer)  # the plain Trainer: the callback alone
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.train()
    assert any(issubclass(w.category, fk.FreezekitWarning) and "does not hold" in str(w.message) for w in caught)


def test_trainer_ddp_rebuilds_the_wrapper_and_the_plain_trainer_refuses(tmp_path):
    script = Path(__file__).parent / "dist" / "trainer_app.py"
    first, second = two_ranks(script, tmp_path / "mixin")
    assert "bert.encoder.layer.1.attention.self.query.weight" in first["trainable"]
    assert first["sums"] == second["sums"]
    assert [c["after"] for c in first["sync_checks"]] == ["the phase at epoch 2, step 8", "training"]
    assert all(c["ranks_in_sync"] for c in first["sync_checks"])
    with pytest.raises(AssertionError, match="plain Trainer's DDP wrapper cannot be rebuilt from a callback"):
        two_ranks(script, tmp_path / "plain", "plain")


def test_a_phase_by_step_lands_where_the_same_phase_by_epoch_does(tmp_path):
    by_epoch = trainer(tmp_path / "epoch", 3, callback(), save_strategy="no")
    by_epoch.train()
    at_step = fk.Schedule(fk.Phase(2 * STEPS_PER_EPOCH, fk.Policy(fk.unfreeze("bert.encoder.layer.1")), unit="step",
                                   lr_mult=LR_MULT))
    by_step = trainer(tmp_path / "step", 3, FreezekitCallback(callback().driver.policy, at_step), save_strategy="no")
    by_step.train()
    for (name, a), b in zip(by_epoch.model.state_dict().items(), by_step.model.state_dict().values()):
        assert torch.equal(a, b), name
