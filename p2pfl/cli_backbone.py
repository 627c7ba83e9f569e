"""`p2pfl backbone`: pre-train a frozen backbone (`pretrain`) and describe a backbone file (`info`).

The work is `p2pfl.learn.backbone`; this module is the command line around it (registered as a
sub-command group by `p2pfl.cli`).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from p2pfl.errors import ConfigError
from p2pfl.learn import backbone
from p2pfl.learn.models import MODELS

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="pre-trained frozen backbones: only the output layer is then trained and gossiped (bristle)")
console = Console()
err = Console(stderr=True)


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def pretrain(
    dataset: str = typer.Option(..., help="digits, mnist1d, synthetic or npz:PATH (as the peers' `dataset`)"),
    model: str = typer.Option(..., help=f"model: {', '.join(MODELS)} (as the peers' `model`)"),
    out: Path = typer.Option(..., help="backbone file to write (safetensors)"),
    public_fraction: float = typer.Option(0.2, help="fraction of the training split used here and held out from "
                                                    "every peer that uses this backbone"),
    hidden: str = typer.Option("64", help="mlp hidden widths, e.g. 64,32 (as the peers' `hidden`)"),
    seed: int = typer.Option(0, help="seed of the public split and the initial model"),
    epochs: float = typer.Option(50.0, help="training epochs over the public part"),
    lr: float = typer.Option(0.1, help="SGD learning rate"),
) -> None:
    """Train MODEL on a public fraction of DATASET's training split and save every layer but the output
    layer, with a BLAKE3 content hash."""
    try:
        widths = tuple(int(h) for h in hidden.split(",") if h.strip())
    except ValueError:
        _fail(f"--hidden: expected comma-separated widths such as 64,32, got {hidden!r}")
    try:
        if model not in MODELS:
            raise ConfigError(f"--model: unknown value {model!r}; allowed: {', '.join(MODELS)}")
        if not widths or min(widths) < 1:
            raise ConfigError(f"--hidden: layer widths must be >= 1, got {hidden!r}")
        if not 0 <= seed < 2**63:
            raise ConfigError(f"--seed: must be in [0, 2^63), got {seed}")
        if not 0 < epochs <= 10_000 or not 0 < lr < 1e3:
            raise ConfigError(f"--epochs must be in (0, 10000] and --lr in (0, 1000), got {epochs}, {lr}")
        bb, accuracy = backbone.pretrain(dataset, model, out, hidden=widths, public_fraction=public_fraction,
                                         seed=seed, epochs=epochs, lr=lr)
    except ConfigError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"--out: cannot write {out}: {e.strerror}")
    print(f"wrote {out}: {len(bb.tensors)} tensors, blake3 {bb.hash}; trained on {bb.meta['public_count']} of "
          f"{bb.meta['train_size']} training samples (held out from the peers); the whole pre-trained model's test "
          f"accuracy {accuracy:.3f}")


@app.command()
def info(file: Path = typer.Argument(..., help="a backbone file written by `p2pfl backbone pretrain`")) -> None:
    """Print a backbone's layers, shapes, what it was trained for, and its content hash (verified)."""
    try:
        bb = backbone.load(file)
    except ConfigError as e:
        _fail(str(e))
    table = Table(title=f"{file}")
    table.add_column("tensor")
    table.add_column("shape", justify="right")
    table.add_column("dtype")
    for name, t in bb.tensors.items():
        table.add_row(name, "x".join(map(str, t.shape)) or "scalar", str(t.dtype).removeprefix("torch."))
    console.print(table)
    for key, value in sorted(bb.meta.items()):
        if key != backbone.HASH_KEY:
            print(f"{key}: {value}")
    print(f"parameters: {sum(t.numel() for t in bb.tensors.values())}")
    print(f"blake3: {bb.hash} (verified)")

