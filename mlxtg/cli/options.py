"""Command-line options shared by `mlxtg up` and `mlxtg service install`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="models.yaml to serve.")]
ModelOpt = Annotated[
    str | None, typer.Option("--model", "-m", help="A model path or Hugging Face id.")
]
HostOpt = Annotated[str | None, typer.Option(help="Address to listen on [127.0.0.1].")]
PortOpt = Annotated[int | None, typer.Option(help="Port to listen on [5001].")]
