package e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"testing"

	"github.com/hyphae-run/hyphae/kernel/kerneltest"
)

// TestVirtioKernel runs hyphae and dimension on a Firecracker-style kernel
// (built from Firecracker's CI guest config: virtio-blk, virtio-console and
// virtio-mmio built in; no NVMe, one UART) under QEMU. The qemu driver
// reads that from the kernel's embedded config and gives the guest
// virtio-blk drives and a virtio-serial channel, which the agent finds by
// name: a hyphae run and a dimension run's whole event stream go over
// them. Two VM boots.
func TestVirtioKernel(t *testing.T) {
	e := setup(t)
	kern := kerneltest.FirecrackerPath(t)

	t.Run("hyphae run", func(t *testing.T) {
		e.build(t, "hello-go", "hello-go")
		r := e.run(t, 4, "hello-go", "--kernel", kern, "--env", "GREETING=over virtio", "--env", "EXIT_CODE=4")
		if r.stdout != "hello from go\nGREETING=over virtio\n" {
			t.Errorf("stdout %q", r.stdout)
		}
	})

	t.Run("dimension run", func(t *testing.T) {
		bins := dimBinaries(t, e)
		t.Setenv("HYPHAE_LIBEXEC", bins.dir)
		s := startDimension(t, e, bins, kern)
		defer s.stop()
		img := hyphaeImage(t, e, "build", "--binary", bins.echoGo, "--name", "echo-go-virtio", "--with-agent")
		var b bundleBody
		s.postFile("/bundles/push", map[string]string{"name": "echo-go"}, "file", img).
			expect(t, "push echo-go", http.StatusCreated, &b)
		payload := json.RawMessage(`{"over":"virtio-serial"}`)
		id := s.startAsync("echo-go", payload)
		evs := s.openEvents(t, id, "").rest()
		checkIDs(t, evs, 1, id)
		checkEchoEvents(t, evs, string(payload), "go", fmt.Sprintf("echo-go: echoed %d bytes", len(payload)))
		checkInvocation(t, s, id, b.ID, "async", "completed", 0)
	})
	e.assertNoLeftovers(t)
}
