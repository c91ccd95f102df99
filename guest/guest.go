// Package guest holds the file and command-line formats shared by the host
// (which writes them into images and onto the kernel command line) and the
// guest (hyphae-init and dimension-agent, which read them). These formats are
// a compatibility contract: images built by one version boot under another.
package guest

import (
	"bytes"
	"fmt"
	"net"
	"sort"
	"strconv"
	"strings"

	"github.com/hyphae-run/hyphae/errcode"
)

// Paths inside every hyphae image.
const (
	InitPath       = "/sbin/init"
	AgentPath      = "/sbin/dimension-agent"
	ConfigDir      = "/etc/hyphae"
	EntrypointPath = "/etc/hyphae/entrypoint"
	EnvPath        = "/etc/hyphae/env"
	WorkdirPath    = "/etc/hyphae/workdir"
	ResolvConfPath = "/etc/resolv.conf"
)

// CmdlineEnvPrefix starts a kernel command-line token that sets an
// environment variable for the guest program: hyphae.env.KEY=VALUE.
const CmdlineEnvPrefix = "hyphae.env."

// EncodeEntrypoint renders argv for /etc/hyphae/entrypoint: arguments
// joined by NUL bytes with one trailing NUL, so that a trailing empty
// argument survives a round trip.
func EncodeEntrypoint(argv []string) ([]byte, error) {
	if len(argv) == 0 || argv[0] == "" {
		return nil, errcode.New(errcode.NoEntrypoint, "entrypoint is empty")
	}
	var b bytes.Buffer
	for _, a := range argv {
		if strings.IndexByte(a, 0) >= 0 {
			return nil, errcode.New(errcode.InvalidArgument, "entrypoint argument %q contains a NUL byte", a)
		}
		b.WriteString(a)
		b.WriteByte(0)
	}
	return b.Bytes(), nil
}

// DecodeEntrypoint parses /etc/hyphae/entrypoint: NUL-separated arguments,
// one trailing NUL ignored, empty arguments kept.
func DecodeEntrypoint(b []byte) ([]string, error) {
	b = bytes.TrimSuffix(b, []byte{0})
	if len(b) == 0 {
		return nil, errcode.New(errcode.NoEntrypoint, "entrypoint file is empty")
	}
	argv := strings.Split(string(b), "\x00")
	if argv[0] == "" {
		return nil, errcode.New(errcode.NoEntrypoint, "entrypoint program name is empty")
	}
	return argv, nil
}

// EnvVar is one KEY=VALUE pair.
type EnvVar struct {
	Key, Value string
}

// String renders KEY=VALUE.
func (e EnvVar) String() string { return e.Key + "=" + e.Value }

// ParseEnvVar splits "KEY=VALUE" at the first '='. The key must be non-empty
// and hold no NUL or newline; the value may be empty.
func ParseEnvVar(s string) (EnvVar, error) {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return EnvVar{}, errcode.New(errcode.InvalidEnv, "environment entry %q is not KEY=VALUE", s)
	}
	if strings.ContainsAny(k, "\x00\n") {
		return EnvVar{}, errcode.New(errcode.InvalidEnv, "environment entry %q holds a NUL or newline in its key", s)
	}
	if strings.IndexByte(v, 0) >= 0 {
		return EnvVar{}, errcode.New(errcode.InvalidEnv, "environment entry %q holds a NUL in its value", s)
	}
	return EnvVar{Key: k, Value: v}, nil
}

// EncodeEnvFile renders /etc/hyphae/env: one KEY=VALUE line per variable.
// Values cannot hold newlines in this format, nor end in a carriage return
// (DecodeEnvFile drops one, so that files written on Windows still parse).
func EncodeEnvFile(vars []EnvVar) ([]byte, error) {
	var b bytes.Buffer
	for _, v := range vars {
		if _, err := ParseEnvVar(v.String()); err != nil {
			return nil, err
		}
		if strings.Contains(v.Key, "=") {
			return nil, errcode.New(errcode.InvalidEnv, "key %q holds '=', which /etc/hyphae/env cannot carry", v.Key)
		}
		if strings.Contains(v.Value, "\n") {
			return nil, errcode.New(errcode.InvalidEnv, "value of %s holds a newline, which /etc/hyphae/env cannot carry", v.Key)
		}
		if strings.HasSuffix(v.Value, "\r") {
			return nil, errcode.New(errcode.InvalidEnv, "value of %s ends in a carriage return, which /etc/hyphae/env cannot carry", v.Key)
		}
		b.WriteString(v.String())
		b.WriteByte('\n')
	}
	return b.Bytes(), nil
}

// DecodeEnvFile parses /etc/hyphae/env. Empty lines are skipped; every other
// line must be KEY=VALUE, split at the first '='.
func DecodeEnvFile(b []byte) ([]EnvVar, error) {
	var vars []EnvVar
	for i, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSuffix(line, "\r")
		if line == "" {
			continue
		}
		v, err := ParseEnvVar(line)
		if err != nil {
			return nil, fmt.Errorf("env file line %d: %w", i+1, err)
		}
		vars = append(vars, v)
	}
	return vars, nil
}

// MergeEnv returns base overridden by each later layer, keeping the order
// in which keys first appeared.
func MergeEnv(layers ...[]EnvVar) []EnvVar {
	idx := map[string]int{}
	var out []EnvVar
	for _, layer := range layers {
		for _, v := range layer {
			if i, ok := idx[v.Key]; ok {
				out[i].Value = v.Value
				continue
			}
			idx[v.Key] = len(out)
			out = append(out, v)
		}
	}
	return out
}

// cmdlineEscape percent-encodes what cannot stand in a kernel command-line
// token: '%', whitespace, quotes, '=' when inKey, and every byte outside
// printable ASCII (the kernel's isspace also splits at 0xA0, which occurs
// inside UTF-8 sequences).
func cmdlineEscape(s string, inKey bool) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c == '%' || c <= ' ' || c == '"' || c >= 0x7f || (inKey && c == '=') {
			fmt.Fprintf(&b, "%%%02X", c)
			continue
		}
		b.WriteByte(c)
	}
	return b.String()
}

// cmdlineUnescape reverses %XX encoding. A '%' not followed by two hex
// digits is kept literally, so a hand-written token never fails to parse.
func cmdlineUnescape(s string) string {
	if !strings.Contains(s, "%") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '%' && i+2 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+3], 16, 8); err == nil {
				b.WriteByte(byte(n))
				i += 2
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// EncodeCmdlineEnv renders variables as hyphae.env.KEY=VALUE tokens joined
// by spaces, sorted by key so that the command line is deterministic.
// Secrets must never travel this way: the command line is readable by every
// process in the guest and is logged by the VMM.
func EncodeCmdlineEnv(vars []EnvVar) string {
	sorted := append([]EnvVar(nil), vars...)
	sort.SliceStable(sorted, func(i, j int) bool { return sorted[i].Key < sorted[j].Key })
	toks := make([]string, 0, len(sorted))
	for _, v := range sorted {
		toks = append(toks, CmdlineEnvPrefix+cmdlineEscape(v.Key, true)+"="+cmdlineEscape(v.Value, false))
	}
	return strings.Join(toks, " ")
}

// ParseCmdlineEnv extracts hyphae.env.KEY=VALUE tokens from a kernel command
// line (/proc/cmdline), in order. Other tokens are ignored; a token with an
// empty key is skipped.
func ParseCmdlineEnv(cmdline string) []EnvVar {
	var vars []EnvVar
	for _, tok := range cmdlineFields(cmdline) {
		rest, ok := strings.CutPrefix(tok, CmdlineEnvPrefix)
		if !ok {
			continue
		}
		k, v, _ := strings.Cut(rest, "=")
		k = cmdlineUnescape(k)
		if k == "" {
			continue
		}
		vars = append(vars, EnvVar{Key: k, Value: cmdlineUnescape(v)})
	}
	return vars
}

// cmdlineFields splits a kernel command line at ASCII whitespace, byte by
// byte. strings.Fields would also split at Unicode spaces such as U+0085,
// cutting a hand-written UTF-8 value that the kernel keeps whole.
func cmdlineFields(cmdline string) []string {
	return strings.FieldsFunc(cmdline, func(r rune) bool {
		return r == ' ' || r == '\t' || r == '\n' || r == '\v' || r == '\f' || r == '\r'
	})
}

// CmdlineValue returns the value of the first "key=value" token of a kernel
// command line, and whether it was present.
func CmdlineValue(cmdline, key string) (string, bool) {
	for _, tok := range cmdlineFields(cmdline) {
		if v, ok := strings.CutPrefix(tok, key+"="); ok {
			return v, true
		}
	}
	return "", false
}

// Kernel command-line keys read by hyphae-init and dimension-agent.
const (
	// CmdlineChannel names the host↔guest channel transport:
	// "vsock:<port>" (Firecracker; the guest listens on AF_VSOCK),
	// "serial:<device>" such as "serial:/dev/ttyS1" (QEMU on a kernel
	// with a second UART; the tty is put in raw mode) or
	// "virtio-port:<name>" (QEMU on a kernel with virtio-console: the
	// virtio-serial port the host gave that name).
	CmdlineChannel = "hyphae.channel"
	// CmdlineOverlay asks hyphae-init to put a writable overlay over the
	// read-only root before anything else: "tmpfs" for a memory-backed
	// upper layer, or a block device path (an empty ext4 such as
	// /dev/vdb) for a disk-backed one.
	CmdlineOverlay = "hyphae.overlay"
	// CmdlineDNS carries the guest's DNS servers, comma-separated
	// ("hyphae.dns=192.0.2.53,198.51.100.53"); hyphae-init writes them to
	// /etc/resolv.conf.
	CmdlineDNS = "hyphae.dns"
	// CmdlineModules names a block device holding kernel modules
	// ("hyphae.modules=/dev/nvme1n1"): an ext4 with the modules as flat
	// .ko files and ModulesLoadFile. hyphae-init mounts it read-only,
	// loads them in that order and unmounts it before anything else needs
	// the drivers (the NIC of a kernel whose virtio_net is a module).
	CmdlineModules = "hyphae.modules"
)

// ModulesLoadFile is the file, at the root of a hyphae.modules device,
// listing the .ko files to load, one per line, dependencies first.
const ModulesLoadFile = "modules.load"

// ResolvConf renders /etc/resolv.conf for the comma-separated server list
// of a hyphae.dns token. Entries that are not IP addresses are dropped, so
// that a hostile command line cannot inject other resolver options.
func ResolvConf(servers string) []byte {
	var b bytes.Buffer
	for _, s := range strings.Split(servers, ",") {
		if ip := net.ParseIP(strings.TrimSpace(s)); ip != nil {
			b.WriteString("nameserver " + ip.String() + "\n")
		}
	}
	return b.Bytes()
}
