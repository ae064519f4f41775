"""`vsal`: the torch-free command line (media inspection now; `vsal run` arrives with the runtime)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from vsal.runtime.errors import VsalError


def main() -> None:
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except VsalError as exc:
        click.echo(f"vsal: error: {exc}", err=True)
        sys.exit(1)


@click.group(help="Run video-SALMONN without torch.")
@click.version_option(package_name="vsal")
def cli() -> None:
    pass


@cli.command(help="Show what the release's sampling takes from a media file.")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON.")
def probe(path: Path, as_json: bool) -> None:
    from vsal.runtime.media import probe_media

    info = probe_media(path)
    if as_json:
        click.echo(json.dumps(info.to_dict()))
        return
    click.echo(f"{path}")
    if info.video_seconds is not None:
        click.echo(
            f"  video: {info.video_codec} {info.width}x{info.height}, {info.video_seconds:.2f} s -> "
            f"{info.clips} clips, {2 * info.clips} frames at 2 fps"
            + (" (truncated to the release's 60 s)" if info.truncated else "")
        )
    else:
        click.echo("  video: none")
    if info.audio_seconds is not None:
        click.echo(
            f"  audio: {info.audio_codec} {info.sample_rate} Hz, {info.channels} channel(s), "
            f"{info.audio_seconds:.2f} s"
        )
    else:
        click.echo("  audio: none")
