"""``freezekit eval``: a real run's exported model, evaluated on the run's own validation split and
on another folder, agrees with the run's records and with timm evaluating the same files by hand."""

from __future__ import annotations

import json
import multiprocessing
from collections import Counter

import pytest
import timm
import torch
import yaml
from conftest import save_images
from PIL import Image
from timm.data import create_transform, resolve_data_config
from typer.testing import CliRunner

from freezekit.cli import app
from freezekit.recipe import loads
from freezekit.train.data import shapes
from freezekit.train.evaluation import evaluate, labelled_folder
from freezekit.train.export import load
from freezekit.train.run import run
from freezekit.train.sources import image_folder

runner = CliRunner()
VAL_FRACTION, SEED = 0.25, 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-epoch run on DATA/CLASS/*.png, a quarter of each class held out by the seed."""
    tmp = tmp_path_factory.mktemp("eval")
    split, _, classes = shapes(image_size=32, train_size=48, val_size=1, seed=1)
    save_images(tmp / "data", split, classes)
    recipe = loads(f"""
seed: {SEED}
model: {{name: "timm:test_resnet", pretrained: false}}
data: {{kind: image_folder, path: "{tmp / 'data'}", image_size: 32, val_fraction: {VAL_FRACTION}, workers: 0}}
train: {{epochs: 2, batch_size: 8}}
""", "eval.yaml")
    run(recipe, output=tmp / "run", quiet=True)
    return tmp, classes


def _by_hand(model_folder, samples, classes):
    """Correct answers per class name: timm loads the export alone and preprocesses each file itself."""
    model = timm.create_model("local-dir:" + str(model_folder), pretrained=True).eval()
    transform = create_transform(**resolve_data_config(model=model), is_training=False)
    correct = Counter()
    with torch.no_grad():
        for path, label in samples:
            with Image.open(path) as image:
                predicted = model(transform(image.convert("RGB"))[None]).argmax(1).item()
            correct[classes[label]] += predicted == label
    return correct


def _eval(*args):
    result = runner.invoke(app, ["eval", *map(str, args), "--workers", "0"])
    assert result.exit_code == 0, result.output
    return result


def test_eval_gives_the_runs_last_validation_accuracy_and_each_class_by_hand(trained):
    tmp, classes = trained
    run_dir = tmp / "run"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r.get("split") == "val"][-1]
    _, val, _ = image_folder(tmp / "data", VAL_FRACTION, SEED)  # the run's split, as the run drew it

    report = json.loads(_eval(run_dir, "--json").stdout)
    assert report["accuracy"] == last["accuracy"]
    assert report["loss"] == pytest.approx(last["loss"], rel=1e-5)
    assert report["images"] == sum(c["images"] for c in report["classes"].values()) == len(val)
    assert {name: c["images"] for name, c in report["classes"].items()} == \
        {classes[label]: n for label, n in sorted(Counter(label for _, label in val).items())}
    by_hand = _by_hand(run_dir / "model", val, classes)
    assert {name: c["correct"] for name, c in report["classes"].items()} == {n: by_hand[n] for n in report["classes"]}

    lines = _eval(run_dir).stdout.splitlines()  # the same, as text
    assert lines[0].startswith(f"{run_dir / 'model'} on the validation split of {run_dir / 'recipe.yaml'}")
    assert lines[1] == (f"accuracy {report['accuracy']:.2%} ({report['correct']}/{report['images']})  "
                        f"loss {report['loss']:.4f}")
    assert lines[2].split() == ["class", "images", "correct", "accuracy"]
    assert [row.split() for row in lines[3:]] == [[name, str(c["images"]), str(c["correct"]), f"{c['accuracy']:.2%}"]
                                                  for name, c in report["classes"].items()]


def test_eval_on_another_folder_by_the_models_class_names(trained):
    tmp, classes = trained
    other, _, _ = shapes(image_size=40, train_size=12, val_size=1, seed=7)  # another size: the model resizes
    save_images(tmp / "other" / "val", other, classes, keep=classes[1:])  # PATH/val/CLASS/*: two of three classes
    (tmp / "other" / "train").mkdir()

    report = json.loads(_eval(tmp / "run", "--data", tmp / "other", "--model", "model-best", "--batch-size", 5,
                              "--json").stdout)
    assert report["data"] == str(tmp / "other" / "val") and report["model"] == str(tmp / "run" / "model-best")
    samples = [(str(path), classes.index(path.parent.name)) for path in sorted((tmp / "other" / "val").rglob("*.png"))]
    assert sorted(report["classes"]) == classes[1:] and report["images"] == len(samples)
    by_hand = _by_hand(tmp / "run" / "model-best", samples, classes)
    assert {name: c["correct"] for name, c in report["classes"].items()} == {n: by_hand[n] for n in report["classes"]}
    assert report["correct"] == sum(by_hand.values())


@pytest.mark.parametrize("problem", ["unknown class", "missing run", "corrupt image", "no recipe"])
def test_eval_fails_in_one_line_without_traceback(trained, tmp_path, problem):
    tmp, classes = trained
    folder = tmp_path / "data"
    (folder / classes[0]).mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(folder / classes[0] / "good.png")
    args, named = {
        "unknown class": (["--data", folder], "'dog'"),
        "missing run": ([], str(tmp_path / "nope")),
        "corrupt image": (["--data", folder, "--workers", "2"], str(folder / classes[0] / "x.png")),
        "no recipe": ([], "recipe.yaml"),
    }[problem]
    run_dir = tmp_path / "nope" if problem == "missing run" else tmp / "run"
    if problem == "unknown class":
        (folder / "dog").mkdir()
    if problem == "corrupt image":
        (folder / classes[0] / "x.png").write_bytes(b"\x89PNG not really" * 20)
    if problem == "no recipe":
        run_dir = tmp_path / "run"
        (run_dir / "model").mkdir(parents=True)
        for file in (tmp / "run" / "model").iterdir():
            (run_dir / "model" / file.name).write_bytes(file.read_bytes())
    result = runner.invoke(app, ["eval", str(run_dir), *map(str, args)])
    assert result.exit_code == 1 and "Traceback" not in result.output and result.stdout == ""
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1 and named in result.stderr
    if problem == "unknown class":
        assert ", ".join(classes) in result.stderr


def test_evaluate_stops_its_workers_when_an_image_stops_it(trained, tmp_path):
    """Held by the error's traceback (a notebook keeps the last one), they would live on."""
    tmp, classes = trained
    (tmp_path / classes[0]).mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / classes[0] / "good.png")
    (tmp_path / classes[0] / "x.png").write_bytes(b"\x89PNG not really")
    net, config = load(tmp / "run" / "model")
    source = labelled_folder(tmp_path, dict(resolve_data_config(pretrained_cfg=config["pretrained_cfg"])), classes, 2)
    before = set(multiprocessing.active_children())
    with pytest.raises(ValueError, match="cannot read") as failed:
        evaluate(net, source, torch.device("cpu"), workers=2)
    assert failed.traceback and set(multiprocessing.active_children()) == before


def test_a_relative_data_path_is_recorded_absolute_so_eval_reads_the_same_split_from_anywhere(tmp_path, monkeypatch):
    split, _, classes = shapes(image_size=32, train_size=24, val_size=1, seed=2)
    save_images(tmp_path / "data", split, classes)
    monkeypatch.chdir(tmp_path)
    recipe = loads(f"""
seed: {SEED}
model: {{name: "timm:test_resnet", pretrained: false}}
data: {{kind: image_folder, path: data, image_size: 32, val_fraction: {VAL_FRACTION}, workers: 0}}
train: {{epochs: 1, batch_size: 8}}
""", "relative.yaml")
    run(recipe, output="run", quiet=True)
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["data"]["path"] == str(tmp_path / "data")

    monkeypatch.chdir(tmp_path / "run" / "checkpoints")  # where "data" names nothing
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    report = json.loads(_eval(tmp_path / "run", "--json").stdout)
    assert report["accuracy"] == [r for r in records if r.get("split") == "val"][-1]["accuracy"]
    assert report["images"] == len(image_folder(tmp_path / "data", VAL_FRACTION, SEED)[1])
