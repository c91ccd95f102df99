// Command boot is hyphae's boot benchmark (not a test): it times a run
// from the start of `hyphae run` to the program's first output and to its
// exit, split into phases, over several repetitions, and compares it with
// a baseline measured in the same run: the VMM started by hand on the same
// kernel, image, init and program, with none of hyphae's host side (no
// registry, writable layer, QMP or API wait, console following or
// teardown).
//
//	go run ./bench/boot [-vmm auto|qemu|firecracker] [-reps 5] [-kernel PATH]
//
// Phases of a hyphae run (host wall clock unless noted):
//
//	spawn     Start called → VMM ready (reconcile, image and kernel lookup,
//	          writable layer, VMM process, QMP/API socket answering)
//	pre-kernel VMM ready → guest clock starts: host time to first output
//	          less the guest's uptime when the program printed: firmware,
//	          loading and decompressing a bzImage (slow under TCG), and the
//	          host's console polling (5 ms)
//	kernel    guest clock: kernel start → PID 1 (hyphae-init) executed,
//	          from the kernel's log buffer (/dev/kmsg), which keeps the
//	          message while quiet keeps it off the console
//	init      guest clock: hyphae-init executed → program started
//	program   guest clock: program start → its first line printed
//	exit      first output read → hyphae-init's exit status line read
//	vmm-exit  status line → VMM process gone (sync, reboot, QEMU exit)
//	teardown  VMM gone → runtime dir, writable layer and row removed
//
// The program's start time has 10 ms resolution (USER_HZ); the guest clock
// under TCG runs close to, not exactly at, host time. The harness is the
// same for Firecracker: -vmm firecracker on a host with KVM, a vmlinux
// kernel (-kernel) and firecracker on PATH.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hyphae-run/hyphae/guestbin"
	"github.com/hyphae-run/hyphae/image"
	"github.com/hyphae-run/hyphae/kernel"
	"github.com/hyphae-run/hyphae/registry"
	"github.com/hyphae-run/hyphae/vm"
	"github.com/hyphae-run/hyphae/vmm"
	"github.com/hyphae-run/hyphae/vmm/qemu"
	"github.com/hyphae-run/hyphae/vmm/vmmproc"
)

// clockTick is the guest's USER_HZ.
const clockTick = 10 * time.Millisecond

// baselineTimeout bounds one baseline boot.
const baselineTimeout = 2 * time.Minute

func main() {
	driver := flag.String("vmm", vm.Auto, "VMM: auto, qemu or firecracker")
	reps := flag.Int("reps", 5, "repetitions of each measurement")
	kern := flag.String("kernel", filepath.Join(kernel.DefaultCacheDir, kernel.CurrentLink), "guest kernel the VMM can boot")
	flag.Parse()
	if err := bench(*driver, *kern, *reps); err != nil {
		log.Fatal(err)
	}
}

func bench(want, kernelPath string, reps int) error {
	ctx := context.Background()
	work, err := os.MkdirTemp("", "hybench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	os.Setenv(vmmproc.EnvRuntimeDir, filepath.Join(work, "rt"))
	os.Setenv(guestbin.EnvLibexec, filepath.Join(work, "bin"))
	for _, pkg := range []string{"./cmd/hyphae-init", "./bench/boot/probe"} {
		if err := goBuild(pkg, filepath.Join(work, "bin")); err != nil {
			return err
		}
	}
	quiet := slog.New(slog.DiscardHandler)
	reg, err := registry.Open(ctx, filepath.Join(work, "home"), quiet)
	if err != nil {
		return err
	}
	defer reg.Close()
	rt := vm.New(vm.Options{Registry: reg, Logger: quiet})
	if _, err := rt.AddKernel(ctx, kernelPath, "bench"); err != nil {
		return err
	}
	b := &image.Builder{Store: reg, Logger: quiet}
	img, err := b.Build(ctx, image.BuildOptions{Binary: filepath.Join(work, "bin", "probe"), Name: "bench-probe"})
	if err != nil {
		return err
	}
	choice, err := rt.ChooseDriver(ctx, want)
	if err != nil {
		return err
	}
	fmt.Printf("boot benchmark: %s (%s), kernel %s, %d reps, %d cores\n", choice.Driver, orDash(choice.Accel), kernelPath, reps, runtime.NumCPU())
	kvmWhy, _, _ := strings.Cut(choice.KVMReason, "\n")
	fmt.Printf("driver choice: %s; KVM: %s\n\n", choice.Reason, kvmWhy)

	phases := map[string][]time.Duration{}
	var order []string
	add := func(name string, d time.Duration) {
		if _, ok := phases[name]; !ok {
			order = append(order, name)
		}
		phases[name] = append(phases[name], d)
	}
	for i := 0; i < reps; i++ {
		if err := hyphaeRun(ctx, rt, choice.Driver, add); err != nil {
			return fmt.Errorf("hyphae run %d: %w", i+1, err)
		}
		first, exit, err := baseline(ctx, choice, kernelPath, img.Path, work)
		if err != nil {
			return fmt.Errorf("baseline %d: %w", i+1, err)
		}
		add("baseline: first output", first)
		add("baseline: exit", exit)
	}
	fmt.Printf("%-26s %10s %10s %10s\n", "phase (median of "+strconv.Itoa(reps)+")", "median", "min", "max")
	for _, name := range order {
		ds := phases[name]
		slices.Sort(ds)
		fmt.Printf("%-26s %10s %10s %10s\n", name, ms(ds[len(ds)/2]), ms(ds[0]), ms(ds[len(ds)-1]))
	}
	med := func(n string) time.Duration { ds := phases[n]; return ds[len(ds)/2] }
	fmt.Printf("\nratio hyphae/baseline: first output %.2fx, exit %.2fx, exit incl. teardown %.2fx\n",
		ratio(med("total: first output"), med("baseline: first output")),
		ratio(med("total: exit"), med("baseline: exit")),
		ratio(med("total: torn down"), med("baseline: exit")))
	return nil
}

// hyphaeRun does what `hyphae run bench-probe` does, through the vm
// package, and records its phases.
func hyphaeRun(ctx context.Context, rt *vm.Runtime, driver string, add func(string, time.Duration)) error {
	v, err := rt.Start(ctx, vm.RunOptions{Image: "bench-probe", VMM: driver})
	if err != nil {
		return err
	}
	var first *vm.Line
	res, err := v.Supervise(ctx, vm.SuperviseOptions{OnLine: func(l vm.Line) {
		if first == nil && l.Kind == vm.LineProgram && strings.HasPrefix(l.Text, "bench-probe:") {
			first = &l
		}
	}})
	if err != nil {
		return err
	}
	if first == nil || res.ExitCode != 0 || res.Exited.IsZero() {
		return fmt.Errorf("no probe line or exit status (exit %d)", res.ExitCode)
	}
	g, err := parseProbe(first.Text)
	if err != nil {
		return err
	}
	add("spawn", v.Spawned.Sub(v.Began))
	add("pre-kernel", first.At.Sub(v.Spawned)-g.uptime)
	add("kernel (guest clock)", g.initStart)
	add("init (guest clock)", g.selfStart-g.initStart)
	add("program (guest clock)", g.uptime-g.selfStart)
	add("exit", res.Exited.Sub(first.At))
	add("vmm-exit", res.Gone.Sub(res.Exited))
	add("teardown", res.TornDown.Sub(res.Gone))
	add("total: first output", first.At.Sub(v.Began))
	add("total: exit", res.Exited.Sub(v.Began))
	add("total: torn down", res.TornDown.Sub(v.Began))
	return nil
}

type probe struct{ initStart, selfStart, uptime time.Duration }

func parseProbe(line string) (probe, error) {
	var p probe
	for _, f := range strings.Fields(strings.TrimPrefix(line, "bench-probe:")) {
		k, v, _ := strings.Cut(f, "=")
		n, err := strconv.ParseFloat(v, 64)
		if err != nil {
			return p, fmt.Errorf("probe line %q: %v", line, err)
		}
		switch k {
		case "init_us":
			p.initStart = time.Duration(n) * time.Microsecond
		case "self_ticks":
			p.selfStart = time.Duration(n) * clockTick
		case "uptime":
			p.uptime = time.Duration(n * float64(time.Second))
		}
	}
	return p, nil
}

// baseline boots the same kernel and image with the VMM alone, reading the
// console from its stdout, and returns the time to the probe's line and to
// the VMM's exit.
func baseline(ctx context.Context, c vm.Choice, kernelPath, imagePath, work string) (first, exit time.Duration, err error) {
	var cmd *exec.Cmd
	bootArgs := "console=ttyS0 init=/sbin/init panic=-1 quiet"
	switch c.Driver {
	case vmm.QEMU:
		// The disk the driver gives this kernel (virtio-blk or NVMe).
		disk, root, err := qemu.RootDisk(kernelPath, nil)
		if err != nil {
			return 0, 0, err
		}
		args := []string{"-accel", c.Accel, "-M", "microvm,pcie=on,rtc=on", "-m", "256", "-smp", "1",
			"-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio", "-device", "i8042",
			"-kernel", kernelPath, "-append", bootArgs + " reboot=k rw root=" + root + tscArg(c.Accel),
			// QEMU's own throw-away overlay keeps the image unwritten,
			// as hyphae's qcow2 layer does.
			"-drive", "file=" + imagePath + ",if=none,id=d0,format=raw,snapshot=on", "-device", disk + ",drive=d0,serial=root"}
		if c.Accel == qemu.AccelKVM {
			args = append(args, "-cpu", "host")
		}
		cmd = exec.CommandContext(ctx, c.Binary, args...)
	case vmm.Firecracker:
		cfg := map[string]any{
			"boot-source":    map[string]any{"kernel_image_path": kernelPath, "boot_args": bootArgs + " ro reboot=k pci=off root=/dev/vda"},
			"machine-config": map[string]any{"vcpu_count": 1, "mem_size_mib": 256},
			"drives":         []map[string]any{{"drive_id": "root", "path_on_host": imagePath, "is_root_device": true, "is_read_only": true}},
		}
		path := filepath.Join(work, "fc-baseline.json")
		b, _ := json.Marshal(cfg)
		if err := os.WriteFile(path, b, 0o600); err != nil {
			return 0, 0, err
		}
		cmd = exec.CommandContext(ctx, c.Binary, "--no-api", "--config-file", path)
	default:
		return 0, 0, errors.New("unknown driver " + c.Driver)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return 0, 0, err
	}
	hung := make(chan struct{})
	timer := time.AfterFunc(baselineTimeout, func() { close(hung); _ = cmd.Process.Kill() })
	defer timer.Stop()
	began := time.Now()
	if err := cmd.Start(); err != nil {
		return 0, 0, err
	}
	br := bufio.NewReader(out)
	for first == 0 {
		line, err := br.ReadString('\n')
		if strings.Contains(line, "bench-probe:") {
			first = time.Since(began)
		}
		if err != nil {
			break
		}
	}
	_, _ = io.Copy(io.Discard, br)
	if err := cmd.Wait(); err != nil && first == 0 {
		return 0, 0, fmt.Errorf("%s: %v", c.Binary, err)
	}
	took := time.Since(began)
	select {
	case <-hung:
		return 0, 0, fmt.Errorf("%s did not exit within %s", c.Binary, baselineTimeout)
	default:
	}
	if first == 0 {
		return 0, 0, errors.New("the probe line never appeared")
	}
	return first, took, nil
}

// tscArg mirrors the QEMU driver's TCG workaround, so that the baseline
// boots the same way.
func tscArg(accel string) string {
	if accel != qemu.AccelTCG {
		return ""
	}
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return ""
	}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "cpu MHz" {
			if mhz, err := strconv.ParseFloat(strings.TrimSpace(v), 64); err == nil {
				return fmt.Sprintf(" tsc_early_khz=%d", int(mhz*1000))
			}
		}
	}
	return ""
}

func goBuild(pkg, dir string) error {
	cmd := exec.Command("go", "build", "-trimpath", "-o", dir+"/", pkg)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %v\n%s", pkg, err, out)
	}
	return nil
}

func ms(d time.Duration) string { return fmt.Sprintf("%.0f ms", float64(d)/float64(time.Millisecond)) }

func ratio(a, b time.Duration) float64 { return float64(a) / float64(b) }

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
