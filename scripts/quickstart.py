"""Fine-tune a small timm model with a freezekit policy on synthetic data, and show what trained.

    python scripts/quickstart.py            # about ten seconds on two CPU cores
    python scripts/quickstart.py --help

The model is timm's ``test_resnet`` (random init, nothing downloaded); the data are 32x32 images
of three classes (a bright square in one of three places, over noise). The policy trains the
classifier head and the last stage, keeps everything else frozen with its BatchNorm statistics
fixed, and the script checks that this is exactly what happened.
"""

from __future__ import annotations

import time

import timm
import torch
import torch.nn.functional as F
import typer

import freezekit as fk


def synthetic_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noisy 32x32 images whose class is where a bright square sits."""
    labels = torch.randint(0, 3, (n,), generator=generator)
    images = 0.3 * torch.randn(n, 3, 32, 32, generator=generator)
    for i, label in enumerate(labels.tolist()):
        x = 2 + 10 * label
        images[i, :, 12:20, x:x + 8] += 1.5
    return images, labels


def main(
    steps: int = typer.Option(150, help="Training steps."),
    batch_size: int = typer.Option(32, help="Images per step."),
    lr: float = typer.Option(3e-3, help="AdamW learning rate."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Train test_resnet's head and last stage; prove the rest did not move."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)

    policy = fk.Policy(
        fk.freeze("*"),  # everything frozen, BatchNorm statistics locked (norm="eval")
        fk.unfreeze(fk.last("layer", 1), "fc"),  # but the last stage and the head train
    )
    applied = policy.apply(model)
    print(applied.plan)

    trainable = [p for p in model.parameters() if p.requires_grad]
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.05)
    model.train()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        images, labels = synthetic_batch(batch_size, generator)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 20 == 0 or step == 1:
            print(f"step {step:3d}  loss {loss.item():.3f}")
    elapsed = time.perf_counter() - start

    model.eval()
    with torch.no_grad():
        images, labels = synthetic_batch(512, generator)
        accuracy = (model(images).argmax(1) == labels).float().mean().item()

    moved = sorted({n.rsplit(".", 1)[0] for n, t in model.state_dict().items() if not torch.equal(t, before[n])})
    frozen_moved = [n for n, p in model.named_parameters() if not p.requires_grad and not torch.equal(p, before[n])]
    stats_moved = [n for n, b in model.named_buffers()
                   if "running" in n and not torch.equal(b, before[n]) and not n.startswith(("layer4", "fc"))]
    print(f"\ntrained {steps} steps in {elapsed:.1f}s; accuracy {accuracy:.1%} (chance 33.3%)")
    print(f"modules whose weights or statistics changed: {', '.join(moved)}")
    print(f"frozen parameters that moved: {len(frozen_moved)}; frozen-region BatchNorm statistics that moved: "
          f"{len(stats_moved)}")
    if frozen_moved or stats_moved:
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
