// Command build benchmarks hyphae's image pipeline against the tools it
// wraps, in one run on this machine (a benchmark, not a test: it prints
// figures and asserts nothing):
//
//   - a full Build (staging, hyphae files, digest, mkfs, registration) of
//     examples/hello-go and of a generated JavaScript project with many
//     files, against raw `mkfs.ext4 -d` of the same staged tree;
//   - a cache-hit Build of each;
//   - Import of a ~200 MB multi-layer archive against `tar -x` of its layers
//     plus `mkfs.ext4 -d` of the flattened tree, and the importing process's
//     peak RSS (measured in a child process).
//
// Run it from the module root: go run ./bench/build [-reps N] [-archive-mib M].
package main

import (
	"archive/tar"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"
	"time"

	"github.com/hyphae-run/hyphae/archive/archivetest"
	"github.com/hyphae-run/hyphae/guestbin"
	"github.com/hyphae-run/hyphae/image"
	"github.com/hyphae-run/hyphae/project"
	"github.com/hyphae-run/hyphae/registry"
	"github.com/hyphae-run/hyphae/rootfs"
)

func main() {
	reps := flag.Int("reps", 5, "repetitions of each measurement (medians are printed)")
	archiveMiB := flag.Int("archive-mib", 200, "size of the archive to import")
	child := flag.String("import-child", "", "internal: import this archive into HOME and exit")
	flag.Parse()
	log.SetFlags(0)
	ctx := context.Background()

	if *child != "" {
		importChild(ctx, *child, flag.Arg(0))
		return
	}

	work, err := os.MkdirTemp("", "hyphae-bench-")
	check(err)
	defer os.RemoveAll(work)
	check(buildGuestBinaries(filepath.Join(work, "libexec")))
	os.Setenv(guestbin.EnvLibexec, filepath.Join(work, "libexec"))

	fmt.Printf("hyphae build benchmark: %d repetitions, medians\n\n", *reps)
	fmt.Printf("%-28s %10s %10s %10s %8s\n", "case", "build", "raw mkfs", "cache hit", "ratio")
	jsDir := filepath.Join(work, "js-project")
	check(generateJS(jsDir, 8000))
	for _, c := range []struct{ name, dir string }{
		{"examples/hello-go", "examples/hello-go"},
		{"generated js, 8000 files", jsDir},
	} {
		benchBuild(ctx, work, c.name, c.dir, *reps)
	}

	fmt.Println()
	benchImport(ctx, work, *archiveMiB, *reps)
}

// benchBuild times Build (forced, so mkfs runs every time), a cache hit,
// and raw mkfs.ext4 -d of the same staged tree with the same geometry.
func benchBuild(ctx context.Context, work, name, dir string, reps int) {
	reg, err := registry.Open(ctx, filepath.Join(work, "home-"+strconv.Itoa(len(dir))), nil)
	check(err)
	defer reg.Close()
	b := &image.Builder{Store: reg}
	o := image.BuildOptions{Dir: dir, Name: "bench", Force: true}
	var res image.Result
	build := timeN(reps, func() {
		res, err = b.Build(ctx, o)
		check(err)
	})
	o.Force = false
	hit := timeN(reps, func() {
		r, err := b.Build(ctx, o)
		check(err)
		if !r.Cached {
			log.Fatalf("%s: second build was not a cache hit", name)
		}
	})

	// The same tree, staged once, then given to mkfs.ext4 alone.
	stage := filepath.Join(work, "stage-raw")
	check(os.MkdirAll(stage, 0o755))
	defer os.RemoveAll(stage)
	pr, err := project.Stage(ctx, dir, stage, project.Options{})
	check(err)
	initPath, err := guestbin.Locate(guestbin.Init)
	check(err)
	check(rootfs.WriteHyphaeFiles(stage, rootfs.Files{Init: initPath, Entrypoint: pr.Entrypoint, Env: pr.Env, Workdir: pr.Workdir}))
	raw := rawMkfs(stage, filepath.Join(work, "raw.ext4"), reps)
	fmt.Printf("%-28s %10s %10s %10s %7.2fx   (image %d MiB)\n", name, ms(build), ms(raw), ms(hit),
		float64(build)/float64(raw), res.SizeBytes>>20)
}

// rawMkfs times mkfs.ext4 -d of dir with the geometry hyphae would pick.
func rawMkfs(dir, out string, reps int) time.Duration {
	u, err := rootfs.Measure(context.Background(), dir)
	check(err)
	p, err := rootfs.PlanSize(u, 0)
	check(err)
	mkfs, err := rootfs.MkfsPath()
	check(err)
	return timeN(reps, func() {
		os.Remove(out)
		check(exec.Command(mkfs, "-q", "-F", "-t", "ext4", "-b", "4096", "-N", strconv.FormatInt(p.Inodes, 10),
			"-d", dir, out, strconv.FormatInt(p.SizeBytes/1024, 10)+"k").Run())
	})
}

// benchImport times Import of a multi-layer archive of about mib MiB (in a
// child process, whose peak RSS is reported) against tar -x + mkfs.ext4 -d.
func benchImport(ctx context.Context, work string, mib, reps int) {
	arch := filepath.Join(work, "big.tar")
	check(writeArchive(arch, mib))
	st, err := os.Stat(arch)
	check(err)
	home := filepath.Join(work, "home-import")
	var maxRSS int64
	imp := timeN(reps, func() {
		os.RemoveAll(home)
		cmd := exec.Command(os.Args[0], "-import-child", arch, home)
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		check(cmd.Run())
		maxRSS = max(maxRSS, cmd.ProcessState.SysUsage().(*syscall.Rusage).Maxrss)
	})

	flat := filepath.Join(work, "flat")
	outer := filepath.Join(work, "outer")
	var layers []string
	base := timeN(reps, func() {
		os.RemoveAll(flat)
		os.RemoveAll(outer)
		check(os.MkdirAll(flat, 0o755))
		check(os.MkdirAll(outer, 0o755))
		check(exec.Command("tar", "-xf", arch, "-C", outer).Run())
		layers = manifestLayers(filepath.Join(outer, "manifest.json"))
		for _, l := range layers {
			// GNU tar applies no whiteouts: the baseline does less work.
			check(exec.Command("tar", "-xf", filepath.Join(outer, l), "-C", flat).Run())
		}
		mkfs, err := rootfs.MkfsPath()
		check(err)
		out := filepath.Join(work, "flat.ext4")
		os.Remove(out)
		check(exec.Command(mkfs, "-q", "-F", "-t", "ext4", "-b", "4096", "-d", flat, out, strconv.Itoa(mib*3/2+64)+"M").Run())
	})
	fmt.Printf("import of a %d MiB, %d-layer archive: %s; tar -x + mkfs.ext4 -d: %s; ratio %.2fx; importer peak RSS %d MiB\n",
		st.Size()>>20, len(layers), ms(imp), ms(base), float64(imp)/float64(base), maxRSS>>10)
}

// manifestLayers returns the layer members of a classic archive's
// manifest.json, bottom first.
func manifestLayers(path string) []string {
	b, err := os.ReadFile(path)
	check(err)
	var m []struct{ Layers []string }
	check(json.Unmarshal(b, &m))
	if len(m) != 1 {
		log.Fatalf("%s: want one image, got %d", path, len(m))
	}
	return m[0].Layers
}

// importChild is the measured importer: one Import into a fresh home.
func importChild(ctx context.Context, arch, home string) {
	reg, err := registry.Open(ctx, home, nil)
	check(err)
	defer reg.Close()
	_, err = (&image.Builder{Store: reg}).Import(ctx, image.ImportOptions{Archive: arch, Name: "big"})
	check(err)
}

// writeArchive writes a classic docker-save archive of four layers: three
// of random (incompressible) files totalling about mib MiB, and one of many
// small files that the top layer partly deletes again.
func writeArchive(path string, mib int) error {
	per := int64(mib) << 20 / 3 / 8
	var layers [][]archivetest.Entry
	for l := range 3 {
		layer := []archivetest.Entry{{Name: fmt.Sprintf("data%d/", l), Type: tar.TypeDir}}
		for i := range 8 {
			layer = append(layer, archivetest.Entry{Name: fmt.Sprintf("data%d/blob%d", l, i), RandomSize: per})
		}
		layers = append(layers, layer)
	}
	small := []archivetest.Entry{{Name: "lib/", Type: tar.TypeDir}}
	var whiteouts []archivetest.Entry
	for i := range 3000 {
		small = append(small, archivetest.Entry{Name: fmt.Sprintf("lib/m%04d.js", i), Body: fmt.Sprintf("module.exports=%d\n", i)})
		if i%3 == 0 {
			whiteouts = append(whiteouts, archivetest.Entry{Name: fmt.Sprintf("lib/.wh.m%04d.js", i)})
		}
	}
	layers = append(layers, append(small, archivetest.Entry{Name: "app/", Type: tar.TypeDir},
		archivetest.Entry{Name: "app/run", Body: "#!/bin/sh\n", Mode: 0o755}), whiteouts)
	spec := archivetest.Spec{Layout: archivetest.Classic, Layers: layers}
	spec.Config.Entrypoint = []string{"/app/run"}
	return archivetest.Write(path, spec)
}

// generateJS writes a JavaScript project with n small files in
// node_modules, the shape that makes staging and mkfs work hardest.
func generateJS(dir string, n int) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "package.json"), []byte(`{"name":"bench","scripts":{"start":"node index.js"}}`), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "index.js"), []byte("console.log('bench')\n"), 0o644); err != nil {
		return err
	}
	for i := range n {
		d := filepath.Join(dir, "node_modules", fmt.Sprintf("pkg%03d", i/50), "lib")
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
		body := fmt.Sprintf("module.exports = %d;\n// %0*d\n", i, 64+i%2000, 0)
		if err := os.WriteFile(filepath.Join(d, fmt.Sprintf("f%d.js", i)), []byte(body), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// buildGuestBinaries builds the static hyphae-init into dir.
func buildGuestBinaries(dir string) error {
	cmd := exec.Command("go", "build", "-trimpath", "-o", filepath.Join(dir, guestbin.Init), "./cmd/"+guestbin.Init)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	cmd.Stderr = os.Stderr
	return cmd.Run()
}

// timeN runs f n times and returns the median duration.
func timeN(n int, f func()) time.Duration {
	ds := make([]time.Duration, n)
	for i := range ds {
		start := time.Now()
		f()
		ds[i] = time.Since(start)
	}
	slices.Sort(ds)
	return ds[n/2]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.0f ms", float64(d)/float64(time.Millisecond)) }

func check(err error) {
	if err != nil {
		log.Fatal(err)
	}
}
