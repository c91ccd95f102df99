package firecracker

import (
	"context"
	"fmt"
	"os"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// KVM ioctls and constants (linux/kvm.h) used by ProbeKVM.
const (
	kvmGetAPIVersion       = 0xAE00
	kvmCreateVM            = 0xAE01
	kvmGetVCPUMmapSize     = 0xAE04
	kvmCreateVCPU          = 0xAE41
	kvmSetUserMemoryRegion = 0x4020AE46 // _IOW(KVMIO, 0x46, struct kvm_userspace_memory_region)
	kvmSetTSSAddr          = 0xAE47
	kvmRun                 = 0xAE80
	kvmAPIVersion          = 12
	kvmExitHLT             = 5
	// kvmRunExitReason is the offset of exit_reason in struct kvm_run.
	kvmRunExitReason = 8
)

// probeKVMTimeout bounds the one-instruction guest's run.
const probeKVMTimeout = 3 * time.Second

// kvmMemoryRegion is struct kvm_userspace_memory_region.
type kvmMemoryRegion struct {
	Slot, Flags                              uint32
	GuestPhysAddr, MemorySize, UserspaceAddr uint64
}

// ProbeKVM reports whether KVM really runs a guest on this host, and why
// not. The device node alone proves nothing (nested KVM can expose one that
// hangs guests), so the probe boots the smallest possible guest: one vCPU
// whose reset vector holds a single HLT instruction, and checks that
// KVM_RUN comes back with KVM_EXIT_HLT within a bound. It needs neither
// Firecracker nor a kernel. It is weaker than booting a real kernel (a
// nested KVM may run HLT yet hang a kernel); callers that have QEMU and a
// kernel should prefer qemu.ProbeKVM. A probe that hangs leaves a blocked
// thread behind, so run it from short-lived processes or cache the answer.
func ProbeKVM(ctx context.Context) (bool, string) {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return false, "cannot open /dev/kvm: " + err.Error()
	}
	ioctl := func(fd uintptr, req, arg uintptr) (uintptr, error) {
		r, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, req, arg)
		if errno != 0 {
			return 0, errno
		}
		return r, nil
	}
	if v, err := ioctl(f.Fd(), kvmGetAPIVersion, 0); err != nil || v != kvmAPIVersion {
		f.Close()
		return false, fmt.Sprintf("KVM_GET_API_VERSION = %d, %v; want %d", v, err, kvmAPIVersion)
	}
	type outcome struct {
		ok     bool
		reason string
	}
	done := make(chan outcome, 1)
	go func() {
		defer f.Close()
		ok, reason := runHLTGuest(f.Fd(), ioctl)
		done <- outcome{ok, reason}
	}()
	t := time.NewTimer(probeKVMTimeout)
	defer t.Stop()
	select {
	case o := <-done:
		return o.ok, o.reason
	case <-t.C:
		return false, "a one-instruction guest did not halt within " + probeKVMTimeout.String() + " (nested or broken KVM)"
	case <-ctx.Done():
		return false, "KVM probe cancelled: " + ctx.Err().Error()
	}
}

// runHLTGuest creates a VM with 64 KiB of memory just below 4 GiB (where
// the x86 reset vector 0xFFFFFFF0 lies), puts HLT there and runs one vCPU.
func runHLTGuest(kvm uintptr, ioctl func(fd, req, arg uintptr) (uintptr, error)) (bool, string) {
	vmfd, err := ioctl(kvm, kvmCreateVM, 0)
	if err != nil {
		return false, "KVM_CREATE_VM: " + err.Error()
	}
	defer unix.Close(int(vmfd))
	const memBase, memSize = 0xFFFF0000, 0x10000
	mem, err := unix.Mmap(-1, 0, memSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return false, "mmap guest memory: " + err.Error()
	}
	defer unix.Munmap(mem)
	mem[0xFFF0] = 0xF4 // HLT at the reset vector
	region := kvmMemoryRegion{GuestPhysAddr: memBase, MemorySize: memSize, UserspaceAddr: uint64(uintptr(unsafe.Pointer(&mem[0])))}
	if _, err := ioctl(vmfd, kvmSetUserMemoryRegion, uintptr(unsafe.Pointer(&region))); err != nil {
		return false, "KVM_SET_USER_MEMORY_REGION: " + err.Error()
	}
	// Intel hosts without unrestricted guest need a TSS for real mode.
	_, _ = ioctl(vmfd, kvmSetTSSAddr, 0xFFFBD000)
	vcpufd, err := ioctl(vmfd, kvmCreateVCPU, 0)
	if err != nil {
		return false, "KVM_CREATE_VCPU: " + err.Error()
	}
	defer unix.Close(int(vcpufd))
	size, err := ioctl(kvm, kvmGetVCPUMmapSize, 0)
	if err != nil || size < kvmRunExitReason+4 {
		return false, fmt.Sprintf("KVM_GET_VCPU_MMAP_SIZE = %d: %v", size, err)
	}
	run, err := unix.Mmap(int(vcpufd), 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return false, "mmap kvm_run: " + err.Error()
	}
	defer unix.Munmap(run)
	if _, err := ioctl(vcpufd, kvmRun, 0); err != nil {
		return false, "KVM_RUN: " + err.Error()
	}
	reason := *(*uint32)(unsafe.Pointer(&run[kvmRunExitReason]))
	if reason != kvmExitHLT {
		return false, fmt.Sprintf("a one-instruction guest exited with reason %d, want HLT (%d)", reason, kvmExitHLT)
	}
	return true, "a one-instruction guest ran and halted under KVM"
}
