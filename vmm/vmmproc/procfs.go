package vmmproc

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Identity names one process for its whole life: a PID alone is not enough,
// because the kernel reuses PIDs, so the start time (in clock ticks since
// boot, field 22 of /proc/<pid>/stat) and the binary are recorded with it.
// It is what the registry stores to find a VMM again after hyphae restarts.
type Identity struct {
	PID        int    `json:"pid"`
	StartTicks uint64 `json:"start_ticks"`
	// Binary is the VMM executable's base name, e.g. "qemu-system-x86_64".
	Binary string `json:"binary"`
}

// StartTicks reads the start time of pid from /proc/<pid>/stat.
func StartTicks(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	return parseStartTicks(b)
}

// parseStartTicks extracts field 22 of a /proc/<pid>/stat line. The second
// field (comm) is in parentheses and may itself hold spaces and ')', so
// fields are counted from the last ')'.
func parseStartTicks(stat []byte) (uint64, error) {
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, fmt.Errorf("malformed stat line")
	}
	// After ")" come fields 3, 4, ...; field 22 is the 20th of them.
	fields := strings.Fields(string(stat[i+1:]))
	if len(fields) < 20 {
		return 0, fmt.Errorf("stat line has %d fields after comm, want at least 20", len(fields))
	}
	return strconv.ParseUint(fields[19], 10, 64)
}

// IsSame reports whether pid is still the process that was recorded with
// startTicks and runs binary (compared by base name against
// /proc/<pid>/exe, or argv[0] when exe cannot be read). A dead PID, a
// reused PID or a different program all report false, so hyphae never
// signals a process that is not its VMM.
func IsSame(pid int, startTicks uint64, binary string) bool {
	if pid <= 0 {
		return false
	}
	got, err := StartTicks(pid)
	if err != nil || got != startTicks {
		return false
	}
	return runsBinary(pid, binary)
}

// Alive reports whether the process id names is still running.
func (id Identity) Alive() bool { return IsSame(id.PID, id.StartTicks, id.Binary) }

func runsBinary(pid int, binary string) bool {
	want := filepath.Base(binary)
	if exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid)); err == nil {
		// A binary replaced on disk (package upgrade) reads "… (deleted)".
		if filepath.Base(strings.TrimSuffix(exe, " (deleted)")) == want {
			return true
		}
	}
	// exe is unreadable for another user's process, and names the
	// interpreter for a script; argv[0] still names the program.
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	argv0, _, _ := bytes.Cut(cmdline, []byte{0})
	return len(argv0) > 0 && filepath.Base(string(argv0)) == want
}

// FindByArg returns the processes of this user that run binary (compared
// as in IsSame) with an argument containing sub, e.g. a VMM whose command
// line names a file in a given runtime directory. It is how an orphan
// sweep finds a VMM whose identity was never recorded (its starter died
// between spawning it and writing the record).
func FindByArg(binary, sub string) []Identity {
	var found []Identity
	entries, err := os.ReadDir("/proc")
	if err != nil || sub == "" {
		return nil
	}
	uid := os.Geteuid()
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid <= 0 {
			continue
		}
		if st, err := os.Stat(filepath.Join("/proc", e.Name())); err != nil || !ownedBy(st, uid) {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !bytes.Contains(cmdline, []byte(sub)) || !runsBinary(pid, binary) {
			continue
		}
		ticks, err := StartTicks(pid)
		if err != nil {
			continue
		}
		found = append(found, Identity{PID: pid, StartTicks: ticks, Binary: filepath.Base(binary)})
	}
	return found
}
