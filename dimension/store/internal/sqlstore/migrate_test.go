package sqlstore

import (
	"testing"
	"testing/fstest"

	"github.com/hyphae-run/hyphae/errcode"
)

func TestLoadMigrations(t *testing.T) {
	file := &fstest.MapFile{Data: []byte("SELECT 1;")}
	tests := []struct {
		name  string
		files fstest.MapFS
		want  []int
	}{
		{"in order", fstest.MapFS{"0002_b.sql": file, "0001_a.sql": file, "0003_c.sql": file}, []int{1, 2, 3}},
		{"none", fstest.MapFS{}, nil},
		{"gap", fstest.MapFS{"0001_a.sql": file, "0003_c.sql": file}, nil},
		{"starts at 2", fstest.MapFS{"0002_b.sql": file}, nil},
		{"duplicate version", fstest.MapFS{"0001_a.sql": file, "0001_b.sql": file}, nil},
		{"no number", fstest.MapFS{"init.sql": file}, nil},
		{"not sql", fstest.MapFS{"0001_a.txt": file}, nil},
	}
	for _, tc := range tests {
		ms, err := loadMigrations(tc.files)
		if tc.want == nil && len(tc.files) > 0 {
			if !errcode.HasCode(err, errcode.StoreError) {
				t.Errorf("%s: got %v, %v; want %s", tc.name, ms, err, errcode.StoreError)
			}
			continue
		}
		if err != nil || len(ms) != len(tc.want) {
			t.Fatalf("%s: got %v, %v", tc.name, ms, err)
		}
		for i, m := range ms {
			if m.version != tc.want[i] || m.sql != "SELECT 1;" {
				t.Errorf("%s: migration %d = %+v", tc.name, i, m)
			}
		}
	}
}
