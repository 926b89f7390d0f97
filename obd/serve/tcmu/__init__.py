"""The TCMU backstore (docs/formats.md §7): the kernel's command ring under /dev/uioN, the
TCM-USER netlink family, and the SCSI emulation the ring's commands need."""
