#!/bin/sh
# /init of the test VM's initramfs (built by tests/vm/build.py: busybox-static + modules).
#
# 9p shares (virtio), found by mount tag:
#   ctl        control dir: cmd.sh is run; rc, dmesg and timing are written back
#   hostroot   the host's "/" read-only: the command runs chrooted in it
#   rw0..rw9   read-write host dirs, bind-mounted at their host paths (ctl/rw:
#              one line "N PATH" each)
# Kernel cmdline: vmmods=a,b modules to modprobe before the command.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || mdev -s
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
echo /sbin/modprobe > /proc/sys/kernel/modprobe
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up 2>/dev/null
T0=$(cut -d' ' -f1 /proc/uptime)
for m in virtio_pci 9pnet_virtio 9p configfs; do modprobe $m || echo "VM: modprobe $m failed"; done
grep -q " /sys/kernel/config " /proc/mounts || mount -t configfs configfs /sys/kernel/config
for m in $(echo "${vmmods:-}" | tr ',' ' '); do modprobe $m || echo "VM: modprobe $m failed"; done

OPT=trans=virtio,version=9p2000.L,msize=512000
mkdir -p /ctl
mount -t 9p -o $OPT,cache=none ctl /ctl || { echo "VM: cannot mount 9p tag ctl"; poweroff -f; }
# mount tags in sysfs end in NUL
TAGS=$(cat /sys/bus/virtio/drivers/9pnet_virtio/virtio*/mount_tag 2>/dev/null | tr '\0' '\n')
echo "$TAGS" | grep -qx hostroot || { echo "VM: no hostroot share"; echo 125 > /ctl/rc; poweroff -f; }
R=/newroot
mkdir -p $R
mount -t 9p -o $OPT,ro,cache=loose hostroot $R || { echo "VM: cannot mount hostroot"; poweroff -f; }
mount --bind /proc $R/proc
mount --rbind /sys $R/sys
mount --rbind /dev $R/dev
for d in tmp run var/tmp; do [ -d $R/$d ] && mount -t tmpfs tmpfs $R/$d; done
mkdir -p $R/run/vm/ctl && mount --bind /ctl $R/run/vm/ctl
i=0
while [ $i -le 9 ]; do
  P=$(sed -n "s/^$i //p" /ctl/rw 2>/dev/null)
  if [ -n "$P" ] && echo "$TAGS" | grep -qx "rw$i"; then
    mkdir -p /rw$i
    mount -t 9p -o $OPT,cache=none rw$i /rw$i || echo "VM: cannot mount rw$i"
    mkdir -p "$R$P" 2>/dev/null
    mount --bind /rw$i "$R$P" || echo "VM: cannot bind rw$i at $P"
  fi
  i=$((i + 1))
done
T1=$(cut -d' ' -f1 /proc/uptime)
echo "init ${T0}s command ${T1}s (uptime)" > /ctl/timing
chroot $R /bin/sh -c 'export HOME=/tmp PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin; cd /; exec /bin/sh /run/vm/ctl/cmd.sh'
RC=$?
dmesg > /ctl/dmesg 2>/dev/null
echo $RC > /ctl/rc
sync
poweroff -f
