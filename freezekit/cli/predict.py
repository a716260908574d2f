"""``freezekit predict RUN_DIR IMAGE...``: the top classes of each image, by the model a run exported."""

from __future__ import annotations

from pathlib import Path

import typer

from .errors import user_errors
from .options import ALLOW_IMPORT

BATCH = 32


def command(
    model: Path = typer.Argument(..., metavar="RUN_DIR", help="A run's output folder (its model/ is used) or an "
                                                              "exported model folder."),
    images: list[Path] = typer.Argument(..., metavar="IMAGE", help="Image files."),
    top_k: int = typer.Option(5, "--top-k", min=1, help="How many classes to show per image."),
    allow_import: list[str] = ALLOW_IMPORT,
) -> None:
    """Print the TOP_K most likely classes of each IMAGE, with their probabilities, as the model a
    run exported (RUN_DIR/model) sees them after its own preprocessing."""
    import torch  # here, not above: timm and PIL would slow every other command's start
    from timm.data import resolve_data_config

    from ..train.evaluation import logits_of
    from ..train.export import CONFIG, load
    from ..train.preprocess import eval_transform

    with user_errors():
        folder = model / "model" if (model / "model" / CONFIG).is_file() else model
        if model.is_dir() and not (folder / CONFIG).is_file():
            raise FileNotFoundError(f"{model}: no exported model in it (no {CONFIG} there nor in {model / 'model'})")
        net, config = load(folder, allow_import=allow_import)
        transform = eval_transform(resolve_data_config(pretrained_cfg=config["pretrained_cfg"]))
        inputs = torch.stack([transform(_read(path)) for path in images])  # every image read before any output
        with torch.inference_mode():
            outputs = [net(batch) for batch in inputs.split(BATCH)]
        logits = torch.cat([logits_of(out) for out in outputs])
    names = config.get("label_names")
    if not isinstance(names, list) or len(names) != logits.shape[1]:
        names = [str(i) for i in range(logits.shape[1])]
    width = max(len(n) for n in names)
    probs, indices = logits.float().softmax(dim=1).topk(min(top_k, logits.shape[1]), dim=1)
    for path, row_probs, row_indices in zip(images, probs.tolist(), indices.tolist()):
        typer.echo(str(path))
        for p, i in zip(row_probs, row_indices):
            typer.echo(f"  {names[i]:<{width}}  {p:.4f}")


def _read(path: Path) -> object:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # PIL's plugins raise all four
        raise ValueError(f"{path}: not a readable image ({e})") from None
