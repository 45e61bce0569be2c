"""The microVM runtime seam: a VM per sandbox (Firecracker or cloud-hypervisor) with the guest agent
over vsock. Only detection is built: it needs real hardware virtualisation (VT-x or AMD-V), and the
hosts cove is developed on expose only a paravirtual /dev/kvm (PVM) that cannot boot stock guest
kernels (docs/runtimes.md). A backend plugs in here by implementing `cove.node.runtimes.Runtime`; until
then the node refuses the runtime with the reason `detect` gives."""

from __future__ import annotations

import os
import shutil

VMMS = ("firecracker", "cloud-hypervisor")


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def detect(cpuinfo: str | None = None, modules: str | None = None) -> tuple[bool, str]:
    """(usable, why): a microVM needs /dev/kvm backed by VT-x/AMD-V and a VMM binary."""
    cpuinfo = _read("/proc/cpuinfo") if cpuinfo is None else cpuinfo
    modules = _read("/proc/modules") if modules is None else modules
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    if not os.path.exists("/dev/kvm"):
        return False, "no /dev/kvm"
    if not flags & {"vmx", "svm"}:
        pvm = "kvm_pvm" in modules or os.path.isdir("/sys/module/kvm_pvm")
        why = "/dev/kvm is paravirtual (kvm_pvm), which cannot boot stock guest kernels" if pvm else ""
        return False, "no hardware virtualisation (no vmx/svm CPU flag)" + (f"; {why}" if why else "")
    vmm = next((shutil.which(v) for v in VMMS if shutil.which(v)), None)
    if vmm is None:
        return False, f"no VMM installed ({' or '.join(VMMS)})"
    return False, f"hardware virtualisation and {vmm} found, but cove has no microVM backend yet"
