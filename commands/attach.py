"""``obd attach`` / ``obd detach``: an image as a SCSI disk through TCMU and tcm_loop."""

from __future__ import annotations

import json

import click

from commands._util import SizeType


@click.command(short_help="Attach an image as a SCSI disk through TCMU (configfs).")
@click.option("--size", type=SizeType(), help="Disk size (default: the image's virtual size).")
@click.option("--id", "dev_id", metavar="DEV_ID", help="dev_id appended to the cfgstring.")
@click.option(
    "--hba", type=click.IntRange(0), default=1, show_default=True, help="HBA number (user_N)."
)
@click.option("--name", metavar="NAME", help="Device directory name (default: dev_<hash>).")
@click.option(
    "--max-data-area-mb",
    type=click.IntRange(1, 2048),
    default=64,
    show_default=True,
    help="The device's TCMU data area.",
)
@click.option(
    "--cmd-ring-size-mb",
    type=click.IntRange(1, 512),
    help="The device's command ring (kernel memory; the kernel's default is 8).",
)
@click.option(
    "--wait",
    type=click.FloatRange(0),
    default=30,
    show_default=True,
    help="Seconds to wait for the SCSI disk to appear.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the attachment as JSON.")
@click.argument("config", type=click.Path(dir_okay=False))
def attach(
    size: int | None,
    dev_id: str | None,
    hba: int,
    name: str | None,
    max_data_area_mb: int,
    cmd_ring_size_mb: int | None,
    wait: float,
    as_json: bool,
    config: str,
) -> None:
    """Attach the image CONFIG as a SCSI disk and print its /dev/sdX.

    Makes, in /sys/kernel/config/target, the TCMU device user_HBA/NAME with
    dev_config=overlaybd/CONFIG[;DEV_ID] (as containerd's accelerated-container-image
    does), a tcm_loop target and its LUN. `obd serve --tcmu` (or overlaybd-tcmu) must be
    running: it opens the image when the device is enabled.

    Exit codes: 0 attached, 2 usage, 3 no TCMU in this kernel or a configfs step failed
    (the message names the path and the errno; a refused enable quotes the resultFile),
    4 corrupt image, 7 bad config.
    """
    from obd.serve.tcmu.configfs import attach_image

    att = attach_image(
        config,
        size,
        dev_id=dev_id,
        hba=hba,
        name=name,
        max_data_area_mb=max_data_area_mb,
        cmd_ring_size_mb=cmd_ring_size_mb,
        wait=wait,
    )
    if as_json:
        click.echo(json.dumps({"device": att.block, "name": att.name, "config": att.config,
                               "tcm_loop": att.naa}))  # fmt: skip
    else:
        click.echo(att.block)


@click.command(short_help="Detach a TCMU disk made by obd attach.")
@click.argument("what", metavar="DEVICE|CONFIG")
def detach(what: str) -> None:
    """Detach the TCMU disk DEVICE (/dev/sdX, or user_N/NAME) or the one serving CONFIG:
    remove its tcm_loop LUN and target, then the TCMU device (the handler flushes and
    closes the image).

    Exit codes: 0 detached, 3 no such attachment, no TCMU in this kernel or a configfs
    step failed (the message names the path and the errno).
    """
    from obd.serve.tcmu.configfs import detach as do_detach
    from obd.serve.tcmu.configfs import find, require_tcmu

    require_tcmu()
    do_detach(find(what))
