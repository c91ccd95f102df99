package vm

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestClassify(t *testing.T) {
	for _, tt := range []struct {
		in       string
		kind     LineKind
		text     string
		code     int
		signal   int
		fatalHas string
	}{
		{"hello from go\r\n", LineProgram, "hello from go", 0, 0, ""},
		{"\r\n", LineProgram, "", 0, 0, ""},
		{"[    0.344019] PCI: Fatal: No config space access function found\r\n", LineKernel, "[    0.344019] PCI: Fatal: No config space access function found", 0, 0, ""},
		{"[12345.000001] reboot: Restarting system", LineKernel, "[12345.000001] reboot: Restarting system", 0, 0, ""},
		{"[not a timestamp] program text", LineProgram, "[not a timestamp] program text", 0, 0, ""},
		{"level=WARN msg=\"cannot mount\" component=hyphae-init", LineInit, "level=WARN msg=\"cannot mount\" component=hyphae-init", 0, 0, ""},
		{"level=WARN msg=x component=mine", LineProgram, "level=WARN msg=x component=mine", 0, 0, ""},
		{"qemu-system-x86_64: terminating on signal 15 from pid 7", LineVMM, "qemu-system-x86_64: terminating on signal 15 from pid 7", 0, 0, ""},
		{"hyphae-init: exit code=0\r\n", LineStatus, "", 0, 0, ""},
		{"hyphae-init: exit code=137 signal=9", LineStatus, "", 137, 9, ""},
		{"no newlinehyphae-init: exit code=3", LineStatus, "no newline", 3, 0, ""},
		{"hyphae-init: fatal E304: cannot start /app: no such file", LineStatus, "", -1, 0, "cannot start /app"},
		{"hyphae-init: exit code=x", LineProgram, "hyphae-init: exit code=x", 0, 0, ""},
	} {
		got := Classify(tt.in)
		if got.Kind != tt.kind || got.Text != tt.text {
			t.Errorf("Classify(%q) = %s %q, want %s %q", tt.in, got.Kind, got.Text, tt.kind, tt.text)
			continue
		}
		if tt.kind != LineStatus {
			continue
		}
		if got.Status.ExitCode != tt.code || got.Status.Signal != tt.signal || !strings.Contains(got.Status.Fatal, tt.fatalHas) {
			t.Errorf("Classify(%q).Status = %+v, want code=%d signal=%d fatal~%q", tt.in, got.Status, tt.code, tt.signal, tt.fatalHas)
		}
	}
}

func FuzzClassify(f *testing.F) {
	for _, s := range []string{"hello\r\n", "[ 1.0] x", "hyphae-init: exit code=1 signal=2", "xhyphae-init: fatal y", "level=INFO component=hyphae-init", "\r\r\n"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		l := Classify(s)
		if l.Kind == LineProgram && !strings.Contains(s, l.Text) {
			t.Fatalf("program text %q is not from the line %q", l.Text, s)
		}
		if l.Kind == LineStatus && !strings.HasPrefix(strings.TrimLeft(s, "\r"), l.Text) {
			t.Fatalf("status prefix %q does not start the line %q", l.Text, s)
		}
		if strings.ContainsAny(l.Text, "\n") && !strings.Contains(strings.TrimRight(s, "\r\n"), "\n") {
			t.Fatalf("text %q gained a newline", l.Text)
		}
	})
}

// TestFollowConsole writes a console log the way a VMM does, in pieces,
// and checks that lines arrive whole and in order, that a last line without
// a newline is delivered once the VMM is done, and that a follow started
// after everything was written still reads it all.
func TestFollowConsole(t *testing.T) {
	path := filepath.Join(t.TempDir(), "console.log")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	done := make(chan struct{})
	got := make(chan []Line, 1)
	go func() {
		var lines []Line
		err := followConsole(context.Background(), path, done, func(l Line) bool {
			lines = append(lines, l)
			return true
		})
		if err != nil {
			t.Error(err)
		}
		got <- lines
	}()
	for _, chunk := range []string{"[    0.1] boot\r\nhel", "lo\r\n", strings.Repeat("x", maxLine+10) + "\n", "tailhyphae-init: exit code=4"} {
		if _, err := f.WriteString(chunk); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * followPoll)
	}
	close(done)
	lines := <-got
	var kinds []string
	for _, l := range lines {
		kinds = append(kinds, l.Kind.String())
	}
	want := []string{"kernel", "program", "program", "program", "status"}
	if strings.Join(kinds, ",") != strings.Join(want, ",") {
		t.Fatalf("kinds %v, want %v", kinds, want)
	}
	if lines[1].Text != "hello" || len(lines[2].Text) != maxLine || len(lines[3].Text) != 10 {
		t.Errorf("texts %q, %d, %d bytes", lines[1].Text, len(lines[2].Text), len(lines[3].Text))
	}
	if lines[4].Text != "tail" || lines[4].Status.ExitCode != 4 {
		t.Errorf("status line %+v", lines[4])
	}

	var again int
	if err := followConsole(context.Background(), path, done, func(Line) bool { again++; return true }); err != nil || again != len(lines) {
		t.Errorf("follow of a finished log: %d lines, %v; want %d", again, err, len(lines))
	}
}

func TestFollowConsoleMissingLog(t *testing.T) {
	done := make(chan struct{})
	close(done)
	err := followConsole(context.Background(), filepath.Join(t.TempDir(), "none.log"), done, func(Line) bool { return true })
	if err == nil {
		t.Fatal("following a log that never appeared succeeded")
	}
}

// TestFollowConsoleLastWrite covers lines the VMM writes just before it
// exits, read only once done is closed: they must still be split into
// lines, or a status line after a program line would go unrecognised.
func TestFollowConsoleLastWrite(t *testing.T) {
	path := filepath.Join(t.TempDir(), "console.log")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	done := make(chan struct{})
	first := make(chan struct{})
	got := make(chan []Line, 1)
	go func() {
		var lines []Line
		err := followConsole(context.Background(), path, done, func(l Line) bool {
			if len(lines) == 0 {
				close(first)
			}
			lines = append(lines, l)
			return true
		})
		if err != nil {
			t.Error(err)
		}
		got <- lines
	}()
	if _, err := f.WriteString("first\n"); err != nil {
		t.Fatal(err)
	}
	<-first
	// Let the follower reach the end of the log and wait there; then the
	// last lines and the VMM's exit come together.
	time.Sleep(10 * followPoll)
	if _, err := f.WriteString("last\nhyphae-init: exit code=3\n"); err != nil {
		t.Fatal(err)
	}
	close(done)
	lines := <-got
	var texts []string
	for _, l := range lines {
		texts = append(texts, l.Kind.String()+":"+l.Text)
	}
	if len(lines) != 3 || lines[1].Text != "last" || lines[2].Kind != LineStatus || lines[2].Status.ExitCode != 3 {
		t.Errorf("lines %q, want first, last and the status line (exit code 3)", texts)
	}
}
