"""``freezekit run RECIPE``: fine-tune as the recipe says; ``--resume`` continues a stopped run."""

from __future__ import annotations

import os
import sys

import typer

from ..recipe import load
from ..train.checkpoint import CheckpointError
from ..train.run import RunError, run
from .errors import user_errors
from .options import ALLOW_IMPORT, SET


def command(
    recipe: str = typer.Argument(..., help="The recipe (YAML) to run."),
    set_: list[str] = SET,
    output: str = typer.Option(None, "--output", help="Run directory (default: the recipe's output.dir)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in the output directory."),
    quiet: bool = typer.Option(False, "--quiet", help="Print nothing but errors."),
    allow_import: list[str] = ALLOW_IMPORT,
) -> None:
    """Fine-tune: progress bars (plain lines when piped), metrics.jsonl, summary.md, checkpoints."""
    with user_errors():
        try:
            run(load(recipe, set_), output=output, resume=resume, quiet=quiet, allow_import=allow_import)
        except (RunError, CheckpointError) as e:
            raise ValueError(str(e)) from None
        except OSError as e:  # a full disk while recording metrics, a folder not writable, ...
            where = f": {e.filename}" if e.filename else ""
            raise ValueError(f"the run stopped: {e.strerror or e}{where}") from None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, end here. torch's DTensor caches keep FSDP2's DeviceMesh, and with it the gloo
        # process group, alive after destroy_process_group: its threads still run while the interpreter
        # tears down, which now and then aborts a rank that has finished (SIGABRT, "terminate called
        # without an active exception": 1 in 5 FSDP test runs on a busy machine). All the run wrote is closed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
