"""The recipe schema: every key, its type, its default, and a one-line meaning (pydantic models,
unknown keys refused). ``policy`` and ``schedule`` keep their plain form here; they are read by
:meth:`freezekit.Policy.from_config` and :meth:`freezekit.Schedule.from_config`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, field_validator, model_validator

__all__ = ["Data", "Group", "Model", "Optimizer", "Output", "Recipe", "Train"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)  # no .inf, no .nan


class Model(_Section):
    name: str = Field(description="timm:NAME, torchvision:NAME, or package.module:factory (see --allow-import)")
    pretrained: StrictBool = Field(False, description="load the registry's weights; they must be in the local cache")
    checkpoint: str | None = Field(None, description="a local .safetensors or torch file of weights to start from")
    num_classes: int | None = Field(None, ge=1, description="classifier outputs; default: the data's classes")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to the model factory")


class Data(_Section):
    kind: Literal["shapes", "image_folder", "cifar10", "cifar100"] = Field(
        "shapes", description="built-in shapes, an image folder, or CIFAR's python batches in a local folder")
    path: str | None = Field(None, description="image_folder: PATH/train/CLASS/* and PATH/val/CLASS/*, or PATH/CLASS/*"
                                               " split by val_fraction; cifar10/100: the folder holding the batches")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="image_folder without train/val: each class's share "
                                                              "held out for validation, drawn from the seed")
    image_size: int | None = Field(None, ge=8, le=1024, description="input side; default: the model's (shapes: 64)")
    mean: list[float] | None = Field(None, min_length=3, max_length=3, description="default: the model's")
    std: list[float] | None = Field(None, min_length=3, max_length=3, description="default: the model's")
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = Field(None, description="default: the model's")
    crop_pct: float | None = Field(None, gt=0, le=1, description="evaluation: centre crop of the resized image; "
                                                                  "default: the model's")
    augment: StrictBool = Field(False, description="training: random resized crop and flip (shapes: 4px shift "
                                                   "and flip)")
    auto_augment: str | None = Field(None, description="with augment: timm's policy, e.g. rand-m9-mstd0.5")
    mixup: float = Field(0.0, ge=0, description="mixup alpha (0: off), drawn from (seed, epoch, step)")
    cutmix: float = Field(0.0, ge=0, description="cutmix alpha (0: off)")
    workers: int | None = Field(None, ge=0, description="decoding processes per training process; default: the "
                                                         "cores allow (0 for shapes)")
    on_error: Literal["fail", "skip"] = Field("fail", description="an unreadable image: stop naming it, or skip it "
                                                                  "(and say so)")
    train_size: int = Field(1024, ge=1, description="shapes: training images drawn")
    val_size: int = Field(256, ge=1, description="shapes: validation images drawn")


    @field_validator("auto_augment")
    @classmethod
    def _known_policy(cls, policy: str | None) -> str | None:
        if policy is not None:
            from timm.data import create_transform

            try:  # timm's factory is the judge of its own policy strings (it asserts on unknown ones)
                create_transform(32, is_training=True, auto_augment=policy)
            except (AssertionError, ValueError, KeyError, IndexError) as e:
                raise ValueError(f"{policy!r} is not an auto-augment policy timm knows ({e}); e.g. rand-m9-mstd0.5, "
                                 "augmix-m5, original") from None
        return policy


    @model_validator(mode="after")
    def _policy_needs_augment(self) -> Data:
        if self.auto_augment is not None and (not self.augment or self.kind == "shapes"):
            raise ValueError("auto_augment is applied with augment: true, to image data (not shapes, whose "
                             "augment is a shift and a flip)")
        return self


class Group(_Section):
    select: str | list[str] | dict[str, Any] = Field(description="a pattern, list of patterns or selector mapping")
    lr_mult: float | None = Field(None, gt=0, description="learning rate times this")
    lr: float | None = Field(None, gt=0, description="or this absolute learning rate")
    wd_mult: float | None = Field(None, ge=0, description="weight decay times this")
    weight_decay: float | None = Field(None, ge=0, description="or this absolute weight decay")


class Optimizer(_Section):
    name: Literal["adamw", "adam", "sgd"] = Field("adamw", description="the torch optimizer")
    lr: float = Field(1e-3, gt=0, description="base learning rate (after warmup)")
    weight_decay: float = Field(0.05, ge=0, description="off for biases, norms and tokens")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd: momentum")
    layer_decay: float | None = Field(None, gt=0, le=1, description="layer-wise learning-rate decay (BEiT-style)")
    groups: list[Group] = Field(default_factory=list, description="per-part rates and decay, last wins")
    scheduler: Literal["cosine", "constant"] = Field("cosine", description="learning-rate shape per step")
    warmup_epochs: float = Field(0.0, ge=0, description="linear warmup from 0, in epochs (fractions allowed)")


class Train(_Section):
    epochs: int = Field(5, ge=1, description="passes over the training data")
    batch_size: int = Field(32, ge=1, description="images per step, per process under torchrun; an epoch that "
                            "would end on one image alone leaves it out (BatchNorm cannot train on it), "
                            "another each epoch")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="autocast; fp16 with a gradient "
                                                                   "scaler; auto: bf16 on a GPU with bf16")
    channels_last: StrictBool = Field(False, description="channels-last memory format (faster convolutions on GPUs)")
    compile: StrictBool = Field(False, description="torch.compile the model (recompiled when a phase changes what "
                                                   "trains)")
    cache_features: Literal["auto", True, False] = Field("auto", description="reuse a frozen backbone's features")
    strategy: Literal["auto", "ddp", "fsdp"] = Field("auto", description="under torchrun: ddp (auto) or fsdp")
    grad_clip: float | None = Field(None, gt=0, description="clip the gradient norm to this")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")
    checkpoint_every: int | None = Field(None, ge=1, description="also write checkpoints/last.pt every this many "
                                                                 "steps (a resume goes on from that step)")
    loggers: list[Literal["jsonl", "tensorboard"]] = Field(["jsonl"], description="metrics.jsonl always; "
                                                           "tensorboard: also RUN/tensorboard (the extra)")


class Output(_Section):
    dir: str | None = Field(None, description="where the run is written: relative, no '..' (elsewhere: "
                                               "--output); default runs/NAME")


class Recipe(_Section):
    name: str | None = Field(None, description="default: the file's stem; one plain folder name (runs/NAME)")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds data, initialization and augmentation")
    model: Model
    data: Data = Field(default_factory=Data)
    policy: list[Any] = Field(default_factory=list, description="rules in order; the last that selects decides")
    schedule: list[Any] | dict[str, Any] = Field(default_factory=list, description="phases, each applied once")
    optimizer: Optimizer = Field(default_factory=Optimizer)
    train: Train = Field(default_factory=Train)
    output: Output = Field(default_factory=Output)
    _source: Any = PrivateAttr(None)  # (file, YAML data with lines, paths set by --set), for error locations

    def with_absolute_paths(self) -> Recipe:
        """This recipe with its local paths (``data.path``, ``model.checkpoint``) made absolute from the
        current directory: what a run records, so that its recipe.yaml reads the same files from anywhere."""

        def absolute(path: str | None) -> str | None:
            return None if path is None else str(Path(path).expanduser().absolute())

        return self.model_copy(update={
            "data": self.data.model_copy(update={"path": absolute(self.data.path)}),
            "model": self.model.model_copy(update={"checkpoint": absolute(self.model.checkpoint)})})

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str | None) -> str | None:
        if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}", name):
            raise ValueError("a run's name is one folder name: letters, digits and _ . + -, not starting with '.' "
                             "(no '/' or '..')")
        return name
