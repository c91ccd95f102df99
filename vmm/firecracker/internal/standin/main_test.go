package main

import (
	"strings"
	"testing"
)

func TestParseArgs(t *testing.T) {
	cases := []struct {
		argv []string
		want args
		err  string
	}{
		{[]string{"--api-sock", "/s", "--id", "vm-1"}, args{apiSock: "/s", id: "vm-1"}, ""},
		{[]string{"--api-sock", "/s", "--config-file", "/c"}, args{apiSock: "/s", id: "anonymous-instance", configFile: "/c"}, ""},
		{[]string{"--api-sock=/s"}, args{}, "separate arguments"},
		{[]string{"--api-sock"}, args{}, "requires a value"},
		{[]string{"--api-sock", "--id", "x"}, args{}, "requires a value"},
		{[]string{"--id", "x"}, args{}, "--api-sock is required"},
		{[]string{"--api-sock", "/s", "--id", "a_b"}, args{}, "invalid instance id"},
		{[]string{"--api-sock", "/s", "--boot-timer"}, args{}, "wasn't expected"},
	}
	for _, c := range cases {
		got, err := parseArgs(c.argv)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("%q: err %v, want %q", c.argv, err, c.err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("%q: %+v, %v", c.argv, got, err)
		}
	}
}
