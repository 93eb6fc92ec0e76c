package state

import (
	"bytes"
	"encoding/json"
	"os"
	"reflect"
	"testing"
)

// FuzzDecode loads arbitrary bytes as state.json. decode never panics;
// what it accepts is valid, and writing it the way Save does and loading
// that again gives the same state: a state file survives a restart
// unchanged.
func FuzzDecode(f *testing.F) {
	b, err := os.ReadFile("testdata/v1/state.json")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	f.Add([]byte(`{"version":1}`))
	f.Add([]byte(`{"version":1,"peers":[{"name":"a","addrs":["100.96.0.2","100.96.0.2"]}]} {}`))
	f.Add([]byte("{\"version\":1,\n\"private_key\":\"x\""))
	f.Fuzz(func(t *testing.T, data []byte) {
		st, err := decode(data)
		// A state is a JSON object; nothing else loads.
		if trimmed := bytes.TrimLeft(data, " \t\r\n"); err == nil && (len(trimmed) == 0 || trimmed[0] != '{') {
			t.Fatalf("decode accepted %q, which is not a JSON object", data)
		}
		if err != nil {
			if st != nil {
				t.Fatalf("decode returned a state and %v", err)
			}
			return
		}
		if err := st.Validate(); err != nil {
			t.Fatalf("decode accepted an invalid state: %v", err)
		}
		out := *st
		if out.Peers == nil {
			out.Peers = []Peer{}
		}
		saved, err := json.MarshalIndent(&out, "", "\t")
		if err != nil {
			t.Fatalf("marshalling a decoded state: %v", err)
		}
		back, err := decode(saved)
		if err != nil {
			t.Fatalf("the state as Save writes it does not load: %v\n%s", err, saved)
		}
		if !reflect.DeepEqual(back, &out) {
			t.Fatalf("save → load differs:\n%+v\n%+v", &out, back)
		}
	})
}
