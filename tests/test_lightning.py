"""freezekit in PyTorch Lightning, with the real Lightning: a run with a mid-run unfreeze equals the
same schedule in a plain loop bit for bit, a resume from Lightning's checkpoint equals the
uninterrupted run, and under DDP (2 CPU processes) the ranks stay identical."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

sys.path.insert(0, str(Path(__file__).parent / "dist"))
import lightning_app as app
from conftest import two_ranks

import freezekit as fk

SCRIPT = Path(app.__file__)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_a_lightning_run_equals_the_plain_loop_bit_for_bit():
    module, callback = app.Classifier(), app.callback()
    app.trainer(4, callbacks=[callback]).fit(module)
    plain = app.plain_loop(4)
    assert [(e.phase, e.at) for e in callback.driver.events] == [(0, 2)]
    assert {n for n, p in module.named_parameters() if p.requires_grad} == \
        {n for n, p in plain.named_parameters() if p.requires_grad}
    assert module.net.layer4[0].bn1.training and not module.net.layer3[0].bn1.training
    same_weights(module, plain)  # layer4's BatchNorms trained in train mode after Lightning's validation


def test_resuming_from_a_lightning_checkpoint_ends_bit_identical(tmp_path):
    straight, callback = app.Classifier(), app.callback()
    app.trainer(5, callbacks=[callback]).fit(straight)

    first = app.trainer(3, callbacks=[app.callback()])  # stops after the phase at epoch 2
    first.fit(app.Classifier())
    first.save_checkpoint(tmp_path / "last.ckpt")

    resumed, again = app.Classifier(), app.callback()  # a fresh process would build the same
    app.trainer(5, callbacks=[again]).fit(resumed, ckpt_path=tmp_path / "last.ckpt")
    assert [e.replayed for e in again.driver.events] == [True]
    assert fk.state(resumed) == fk.state(straight)
    same_weights(resumed, straight)


def test_a_second_fit_keeps_what_the_schedule_unfroze_and_trains_it():
    """setup() applies the starting policy again: the phase done in the first fit is replayed into
    the second fit's optimizer, instead of layer4 frozen again for good."""
    module, callback = app.Classifier(), app.callback()
    trainer = app.trainer(3, callbacks=[callback])  # the phase at epoch 2 is in this fit
    trainer.fit(module)
    after_first = {n: p.detach().clone() for n, p in module.net.layer4.named_parameters()}
    trainer.fit_loop.max_epochs = 4
    trainer.fit(module)
    assert [(e.phase, e.replayed) for e in callback.driver.events] == [(0, False), (0, True)]
    assert all(p.requires_grad for p in module.net.layer4.parameters())
    held = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert all(id(p) in held for p in module.net.layer4.parameters())
    assert not torch.equal(module.net.layer4[0].conv1.weight, after_first["0.conv1.weight"])  # it trained on


def test_a_typo_in_a_later_phase_stops_the_fit_before_its_first_step():
    """Not two epochs in, when the phase comes, and named by its phase, not as the starting policy."""
    from freezekit.integrations.lightning import FreezekitFinetuning

    module = app.Classifier()
    callback = FreezekitFinetuning(policy=app.start_policy(), schedule=fk.Schedule(
        fk.Phase(1, fk.Policy(fk.unfreeze("net.layer4"))), fk.Phase(2, fk.Policy(fk.unfreeze("net.layr3")))))
    trainer = app.trainer(3, callbacks=[callback])
    with pytest.raises(fk.NoMatchError, match=r"^schedule\[1\]\.policy\[0\]\.unfreeze: 'net\.layr3' matched nothing"
                                              r" in Classifier; closest: 'net\.layer3'"):
        trainer.fit(module)
    assert trainer.global_step == 0


def test_a_resume_without_the_callback_is_refused_by_name(tmp_path):
    """Lightning's own error would be torch's bare "different number of parameter groups"."""
    first = app.trainer(3, callbacks=[app.callback()])
    first.fit(app.Classifier())
    first.save_checkpoint(tmp_path / "last.ckpt")

    class Tracked(app.Classifier):  # the user's module knows its optimizer, but nobody replays
        def configure_optimizers(self):
            config = super().configure_optimizers()
            fk.track_optimizer(config["optimizer"], self)
            return config

    module = Tracked()
    app.start_policy().apply(module)
    with pytest.raises(fk.StateError, match=r"schedule.replay\(model, optimizer\)"):
        app.trainer(5).fit(module, ckpt_path=tmp_path / "last.ckpt")


def test_lightning_ddp_keeps_both_ranks_identical_after_the_unfreeze_and_after_a_resume(tmp_path):
    first, second = straight = two_ranks(SCRIPT, tmp_path / "straight", "--epochs", "4")
    assert any(n.startswith("layer4") or ".layer4." in n for n in first["trainable"])
    assert first["sums"] == second["sums"]
    assert [c["after"] for c in first["sync_checks"]] == ["the phase at epoch 2, step 4", "training"]
    assert all(c["ranks_in_sync"] for c in first["sync_checks"])

    ckpt = tmp_path / "after-phase.ckpt"
    two_ranks(SCRIPT, tmp_path / "first", "--epochs", "3", "--save", str(ckpt))
    first, second = two_ranks(SCRIPT, tmp_path / "resumed", "--epochs", "4", "--resume", str(ckpt))
    assert first["sums"] == second["sums"]
    assert [c["after"] for c in first["sync_checks"]] == ["replaying the schedule", "training"]
    assert first["sums"] == straight[0]["sums"]  # and the same as the uninterrupted run


def test_a_phase_by_step_lands_where_the_same_phase_by_epoch_does():
    by_epoch, by_step = app.Classifier(), app.Classifier()
    app.trainer(3, callbacks=[app.callback()]).fit(by_epoch)
    at_step = fk.Schedule(fk.Phase(2 * app.BATCHES, fk.Policy(fk.unfreeze("net.layer4")), unit="step", lr_mult=0.5))
    app.trainer(3, callbacks=[app.FreezekitFinetuning(app.start_policy(), at_step)]).fit(by_step)
    same_weights(by_step, by_epoch)
